"""Heads on top of the shared encoder, and the text building blocks they share. Each task builds its
head (spatialnet_dist/tasks/<task>.py `Task.head`); a small head lives in its task's module, these are
the large ones.

A head is called as `head(tokens, pooled, sub_batch) -> dict` with the encoding of the batch's U images,
tokens (U, N, D) patch tokens and pooled (U, D), and the task's sub-batch (its TypedDict in tasks/<task>.py),
whose B images are rows of the encoding (batch_format.own_rows). vqa and regression answer Q questions and
captioning trains C captions about the B images: they do their per-image work once on their own rows (not on
other tasks' images), then gather each question's (caption's) image by "image_index"; regression, which has no
per-image work, gathers straight from the encoding (batch_format.item_rows). Outputs:
  captioning {"logits": (C, Lc-1, V)}, vqa {"logits": (Q, A)}, regression {"count_log1p": (Q,)}.
A head with `visible_tokens` K > 0 (mae's decoder, tasks/mae.py) is called on a masked encoding of its images,
as `head(tokens (B, K, D), pooled, sub_batch, kept (B, K))` with the indices of the K patches the encoder saw.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spatialnet_dist.batch_format import item_rows, own_rows
from spatialnet_dist.networks.presets import Preset
from spatialnet_dist.text import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class VocabSizes:
    """What the heads' input and output layers are sized by."""

    words: int  # caption and question words, specials included
    answers: int  # VQA answer classes
    classes: int  # land-use classes
    tags: int = 0  # multi-label tag names


def _text_layer(preset: Preset, cross: bool) -> nn.Module:
    """One pre-norm transformer layer of the text heads; `cross` adds cross-attention to image tokens."""
    layer = nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer
    return layer(
        preset.text_dim, preset.text_heads, dim_feedforward=4 * preset.text_dim, dropout=preset.head_dropout,
        activation="gelu", batch_first=True, norm_first=True,
    )


class ImageProjection(nn.Sequential):
    """Encoder width -> text width for the image tokens the text heads cross-attend to."""

    def __init__(self, encoder_dim: int, text_dim: int):
        super().__init__(nn.Linear(encoder_dim, text_dim), nn.LayerNorm(text_dim))


# Density a token starts with: 0.1 object each, ~6 over the tiny preset's 64 tokens, the order of the
# synthetic corpus's median count, so the first steps do not spend themselves shrinking a huge sum.
INITIAL_TOKEN_DENSITY = 0.1


class CountRegressionHead(nn.Module):
    """Counts add over the image: a non-negative density per patch token, conditioned on a bag-of-words of
    the count question (which object to count), summed over the tokens; the output is log1p of that sum,
    the scale the loss compares on. A pooled vector would have to learn addition; the sum has it built in."""

    def __init__(self, encoder_dim: int, vocab_size: int, question_dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, question_dim, padding_idx=PAD_ID)
        self.density = nn.Sequential(
            nn.LayerNorm(encoder_dim + question_dim),
            nn.Linear(encoder_dim + question_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
            nn.Softplus(),  # objects per token >= 0
        )
        nn.init.constant_(self.density[3].bias, math.log(math.expm1(INITIAL_TOKEN_DENSITY)))  # softplus^-1

    def forward(self, tokens, pooled, sub_batch) -> dict:
        question = sub_batch["question"]  # (Q, Lq), PAD-padded
        words = (question != PAD_ID).unsqueeze(-1).to(tokens.dtype)  # (Q, Lq, 1)
        bag = (self.embed(question) * words).sum(1) / words.sum(1).clamp(min=1)  # (Q, Dq) mean over real words
        image = tokens[item_rows(sub_batch)]  # (Q, N, D): each question's image
        bag = bag.unsqueeze(1).expand(-1, image.size(1), -1)  # (Q, N, Dq)
        density = self.density(torch.cat([image, bag], -1)).squeeze(-1)  # (Q, N) objects per token
        return {"count_log1p": torch.log1p(density.sum(1))}  # (Q,)


class CaptionDecoder(nn.Module):
    """Transformer decoder over words, cross-attending to the patch tokens.

    Training is teacher forced (input tokens[:, :-1], predicting tokens[:, 1:]); inference is greedy
    (beam 1) or beam search with a GNMT length penalty.
    """

    def __init__(self, encoder_dim: int, preset: Preset, vocab_size: int, max_len: int):
        super().__init__()
        self.max_len = max_len  # positions, BOS and EOS included
        self.project = ImageProjection(encoder_dim, preset.text_dim)
        self.embed = nn.Embedding(vocab_size, preset.text_dim)
        self.pos = nn.Embedding(max_len, preset.text_dim)
        self.decoder = nn.TransformerDecoder(_text_layer(preset, cross=True), preset.decoder_depth)
        self.norm = nn.LayerNorm(preset.text_dim)
        self.lm_head = nn.Linear(preset.text_dim, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied input/output embeddings, as in GPT-2
        # GPT-2's small init: with N(0, 1) a word's own embedding dominates its next-word logits
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def _logits(self, words: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """words (B, T), memory (B, N, Dt) -> (B, T, V). Causal: position t sees words <= t only, so the
        PAD after EOS never reaches a real word and needs no padding mask."""
        T = words.size(1)
        x = self.embed(words) + self.pos(torch.arange(T, device=words.device))  # (B, T, Dt)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=words.device, dtype=x.dtype)
        x = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.lm_head(self.norm(x))

    def _next_logits(self, words: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """-> (B, V) logits of the word after `words`; PAD and BOS are never generated."""
        logits = self._logits(words, memory)[:, -1].float()
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        return logits

    def forward(self, tokens, pooled, sub_batch) -> dict:
        words = sub_batch["tokens"]  # (C, Lc): BOS w.. EOS PAD..
        memory = self.project(own_rows(tokens, sub_batch))[sub_batch["image_index"]]  # (C, N, Dt): once per image
        return {"logits": self._logits(words[:, :-1], memory)}  # (C, Lc-1, V)

    @torch.no_grad()
    def generate(
        self, tokens: torch.Tensor, max_len: int = 0, beam_size: int = 1, length_penalty: float = 0.0
    ) -> list[list[int]]:
        """tokens (B, N, D) -> per image the word ids of its caption (no BOS, EOS or PAD).

        max_len counts BOS/EOS like caption_max_len (0 or more than the decoder's positions: its maximum).
        """
        max_len = min(max_len or self.max_len, self.max_len)
        memory = self.project(tokens)  # (B, N, Dt)
        if beam_size == 1:
            return self._greedy(memory, max_len)
        return self._beam(memory, max_len, beam_size, length_penalty)

    def _greedy(self, memory: torch.Tensor, max_len: int) -> list[list[int]]:
        B = memory.size(0)
        seq = torch.full((B, 1), BOS_ID, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(max_len - 1):
            next_word = self._next_logits(seq, memory).argmax(-1).masked_fill(done, PAD_ID)  # (B,)
            seq = torch.cat([seq, next_word[:, None]], 1)
            done |= next_word == EOS_ID
            if done.all():
                break
        return [_strip(row) for row in seq[:, 1:].tolist()]

    def _beam(self, memory: torch.Tensor, max_len: int, K: int, alpha: float) -> list[list[int]]:
        """Beam search over B images at once (B*K rows). A hypothesis ends at EOS and is scored by its
        log-probability / ((5 + length) / 6) ** alpha (GNMT); an image is done once it has K ended
        hypotheses; at max_len the live beams count as ended. The bookkeeping runs on host lists, with
        one device transfer each way per step."""
        B, device, inf = memory.size(0), memory.device, float("-inf")
        memory = memory.repeat_interleave(K, 0)  # (B*K, N, Dt)
        seq = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=device)
        scores = [[0.0] + [inf] * (K - 1) for _ in range(B)]  # all K beams start as BOS: expand only the first
        ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]

        def penalty(length: int) -> float:
            return ((5 + length) / 6) ** alpha

        for length in range(1, max_len):  # length: words generated after this step, EOS included
            logp = F.log_softmax(self._next_logits(seq, memory), -1)  # (B*K, V)
            V = logp.size(-1)
            cand = (torch.tensor(scores, device=device).unsqueeze(-1) + logp.view(B, K, V)).view(B, K * V)
            top_scores, top_ids = cand.topk(min(2 * K, K * V), dim=1)  # 2K: up to K of them may be EOS
            top_scores, top_ids, prefixes = top_scores.tolist(), top_ids.tolist(), seq[:, 1:].tolist()
            rows = list(range(B * K))  # a finished image keeps its rows, fed PAD
            next_words = [PAD_ID] * (B * K)
            scores = [[inf] * K for _ in range(B)]
            for b in range(B):
                k = 0
                for rank, (s, i) in enumerate(zip(top_scores[b], top_ids[b])):
                    if s == inf or k == K or len(ended[b]) >= K:
                        break
                    beam, word = divmod(i, V)
                    if word == EOS_ID:
                        if rank < K:  # an EOS outside the top K would not have survived the beam
                            ended[b].append((s / penalty(length), prefixes[b * K + beam]))
                        continue
                    rows[b * K + k], next_words[b * K + k], scores[b][k] = b * K + beam, word, s
                    k += 1
            seq = torch.cat([seq[torch.tensor(rows, device=device)], torch.tensor(next_words, device=device)[:, None]], 1)
            if all(len(e) >= K for e in ended):
                break
        prefixes = seq[:, 1:].tolist()
        for b in range(B):
            if len(ended[b]) < K:
                ended[b] += [(s / penalty(len(prefixes[0])), prefixes[b * K + k]) for k, s in enumerate(scores[b]) if s != inf]
        return [_strip(max(e, key=lambda h: h[0])[1]) for e in ended]


def _strip(ids: list[int]) -> list[int]:
    """Word ids up to the first EOS, without PAD/BOS."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out


@functools.lru_cache(maxsize=8)
def grid_positions(num_tokens: int, dim: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(N, dim) fixed 2-D Fourier features of a square grid of N patch tokens, row-major as timm flattens
    them: the first half of the channels encode the row, the second the column, each as sin/cos of the
    patch centre's coordinate u in (-1, 1) at frequencies from half a cycle across the image (sin then rises
    from one side to the other: "left" is one direction) up to the grid's Nyquist. Coordinates are relative,
    so a channel means the same place on any grid. Cached per device: made there once, so a training step
    copies nothing from the host (and a meta-device FLOP count never hands a data-less tensor to training)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or dim % 4:
        raise ValueError(f"grid positions need a square number of tokens and dim divisible by 4, got {num_tokens}, {dim}")
    cycles = 0.5 * max(side, 2) ** torch.linspace(0, 1, dim // 4, device=device)  # (dim/4,) cycles per image width
    u = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side * 2 - 1  # (side,) patch centres
    angles = math.pi * u[:, None] * cycles  # (side, dim/4)
    axis = torch.cat([angles.sin(), angles.cos()], -1)  # (side, dim/2): one coordinate
    rows = axis[:, None].expand(side, side, dim // 2)
    cols = axis[None, :].expand(side, side, dim // 2)
    return torch.cat([rows, cols], -1).reshape(num_tokens, dim)


class VQAHead(nn.Module):
    """Question encoder (word + position embeddings, a small transformer), fusion in which the question
    words cross-attend to the image tokens, and an answer classifier over the answer vocabulary.

    The image tokens the words attend to carry explicit grid positions (`grid_positions`), so that a side
    word ("left", "top") can pick out the tokens of that side; the encoder's own position embedding is
    added at its input and mixed away by its layers."""

    def __init__(self, encoder_dim: int, preset: Preset, vocab_size: int, num_answers: int, max_len: int):
        super().__init__()
        d = preset.text_dim
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        self.pos = nn.Embedding(max_len, d)
        self.question_encoder = nn.TransformerEncoder(
            _text_layer(preset, cross=False), preset.question_depth, enable_nested_tensor=False
        )
        self.project = ImageProjection(encoder_dim, d)
        self.fusion = nn.TransformerDecoder(_text_layer(preset, cross=True), preset.fusion_depth)
        self.classifier = nn.Sequential(
            nn.LayerNorm(2 * d), nn.Linear(2 * d, d), nn.GELU(), nn.Dropout(preset.head_dropout), nn.Linear(d, num_answers)
        )

    def image_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per image, once however many questions it gets: tokens (B, N, D) -> (B, N, d) with grid positions."""
        image = self.project(tokens)  # (B, N, d)
        return image + grid_positions(image.size(1), image.size(2), image.device).to(image.dtype)

    def answer(self, memory: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Per question: memory (Q, N, d) of its image, question (Q, Lq) PAD-padded -> logits (Q, A)."""
        pad = question == PAD_ID
        pad[:, 0] = False  # an empty question would mask every key and make attention NaN
        x = self.embed(question) + self.pos(torch.arange(question.size(1), device=question.device))  # (Q, Lq, d)
        x = self.question_encoder(x, src_key_padding_mask=pad)
        x = self.fusion(x, memory, tgt_key_padding_mask=pad)  # (Q, Lq, d)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        fused = (x * keep).sum(1) / keep.sum(1)  # (Q, d) mean over the question's words
        return self.classifier(torch.cat([fused, memory.mean(1)], -1))  # (Q, A)

    def forward(self, tokens, pooled, sub_batch) -> dict:
        memory = self.image_memory(own_rows(tokens, sub_batch))  # (B, N, d): once per image of the task's
        return {"logits": self.answer(memory[sub_batch["image_index"]], sub_batch["question"])}  # (Q, A)
