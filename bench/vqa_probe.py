"""Are side questions limited by the encoder or by the questions? Probes a trained checkpoint's frozen encoder.

Two probes over the synthetic corpus (`--images`, seed `--seed`; the demo's corpus is 600 images, seed 0):
  tokens   a linear classifier per patch token: does the token hold a building, road or water (>= 20% of its
           pixels, from the drawing's masks)? Trained on the training split's tokens, scored on the others
           (recall and precision), beside the same classifier on the raw patch pixels.
  heads    the checkpoint's own VQA head, then a fresh VQA head trained on the frozen encoder's tokens, on
           `position` questions only: held-out (val + test) accuracy against chance (0.5). A head that fits
           the training questions but stays at chance held-out means too few questions; one that generalises
           on a larger corpus means the encoder already holds what the answers need.

    PYTHONPATH=. python bench/vqa_probe.py runs/demo/checkpoint-000300 [--images 3000] [--steps 1500]

Prints what it measures every 300 steps; asserts nothing. The tokens are computed once (no augmentation).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from spatialnet_dist.checkpoint_weights import load_model
from spatialnet_dist.corpora.synthetic import DRAW, generate, scene_of, split_of
from spatialnet_dist.corpora.synthetic.scene import Scene
from spatialnet_dist.data.transforms import ImageTransform

KINDS = ("building", "road", "water")


def token_probe(tokens: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, train: torch.Tensor) -> None:
    """tokens (M, N, D), images (M, C, S, S), masks (M, N, 3) bool per token and kind, train (M,) bool."""
    patch = images.size(-1) // int(tokens.size(1) ** 0.5)
    raw = F.unfold(images, patch, stride=patch).transpose(1, 2)  # (M, N, C * patch^2)
    for name, feats in (("encoder tokens", tokens), ("raw patch pixels", raw)):
        f = (feats - feats[train].mean((0, 1))) / (feats[train].std((0, 1)) + 1e-6)
        linear = torch.nn.Linear(f.size(-1), len(KINDS))
        opt = torch.optim.Adam(linear.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(300):
            loss = F.binary_cross_entropy_with_logits(linear(f[train]), masks[train].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            guess, truth = linear(f[~train]) > 0, masks[~train]
        for k, kind in enumerate(KINDS):
            hit = (guess[..., k] & truth[..., k]).sum().item()
            print(f"tokens: {name}: {kind} recall {hit / max(1, truth[..., k].sum().item()):.3f} "
                  f"precision {hit / max(1, guess[..., k].sum().item()):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, cfg, vocabs = load_model(args.checkpoint)
    transform = ImageTransform(model.image_size, cfg.model.in_chans)
    images, masks, questions = [], [], []  # questions: (image row, split, text, answer) of type position
    grid = int(model.encoder.patch_embed.num_patches ** 0.5)  # tokens per side
    for index, s in enumerate(generate(args.images, args.seed)):
        scene = Scene(np.random.default_rng([args.seed, index, 0]))  # the drawing again, for its masks
        DRAW[scene_of(index, args.seed)](scene)
        drawn = torch.from_numpy(np.stack([scene.mask(k) for k in KINDS]).astype(np.float32))  # (3, 256, 256)
        masks.append(F.avg_pool2d(drawn[None], drawn.size(-1) // grid)[0].flatten(1).T > 0.2)  # (N, 3)
        images.append(transform(s.image))
        questions += [(len(images) - 1, s.split, q["question"], q["answer"]) for q in s.qa if q["type"] == "position"]
    x = torch.stack(images)  # (M, C, S, S)
    with torch.no_grad():
        tokens = torch.cat([model.encode(chunk)[0] for chunk in x.split(64)])  # (M, N, D)
    image_train = torch.tensor([split_of(i, args.seed) == "train" for i in range(args.images)])
    token_probe(tokens, x, torch.stack(masks), image_train)

    text = torch.tensor([vocabs.words.encode(q[2], cfg.model.question_max_len, bos_eos=False) for q in questions])
    answer = torch.tensor([vocabs.answers.encode(q[3], "position") for q in questions])
    row = torch.tensor([q[0] for q in questions])
    train = torch.tensor([q[1] == "train" for q in questions])
    print(f"heads: {int(train.sum())} training, {int((~train).sum())} held-out position questions")

    def accuracy(head, which: torch.Tensor) -> float:
        head.eval()
        with torch.no_grad():
            logits = head.answer(head.image_memory(tokens)[row[which]], text[which])
        head.train()
        return (logits.argmax(-1) == answer[which]).float().mean().item()

    trained = model.heads["vqa"]
    print(f"heads: the checkpoint's own: train {accuracy(trained, train):.3f}, held-out {accuracy(trained, ~train):.3f}")
    head = copy.deepcopy(trained)
    for m in head.modules():
        if m is not head and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.05)
    ids, t0 = train.nonzero().squeeze(1), time.time()
    for step in range(1, args.steps + 1):
        b = ids[torch.randint(len(ids), (args.batch,))]
        loss = F.cross_entropy(head.answer(head.image_memory(tokens)[row[b]], text[b]), answer[b], ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 300 == 0 or step == args.steps:
            print(f"heads: fresh head step {step}: loss {loss.item():.3f}, train {accuracy(head, train):.3f}, "
                  f"held-out {accuracy(head, ~train):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
