"""Errors that no retry can fix. The command line prints them as a single line (no traceback); raised
inside a Ray Train worker they end the run at once (spatialnet_dist.train.failures)."""


class UserError(Exception):
    """Bad input from a user: a file, key, shard or URL. The message names it in one line."""


class ConfigError(UserError):
    """A bad config key or value (spatialnet_dist.config); the message is one line that names it."""


class NonFiniteLoss(FloatingPointError):
    """A NaN or infinite training loss: the same weights and data meet it again after a restart."""
