"""Does the VQA head tie side words to image positions? Trains the tiny model (encoder + VQA head, no Ray, no
augmentation) on the synthetic corpus's `position` questions ("is there a road in the top part of the image?")
and prints the accuracy on the questions of held-out images (val + test), where chance is 0.5.

    PYTHONPATH=. python bench/vqa_sides.py --images 1200 --steps 300
    PYTHONPATH=. python bench/vqa_sides.py --without-grid-positions   # the fusion as it was before

Prints the held-out accuracy every 50 steps; asserts nothing (the fast check is tests/test_model.py's
test_vqa_fusion_ties_side_words_to_image_positions).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from spatialnet_dist.config import ModelConfig
from spatialnet_dist.corpora.synthetic import generate
from spatialnet_dist.data.transforms import ImageTransform
from spatialnet_dist.model.spatialnet import build_model
from spatialnet_dist.networks import heads
from spatialnet_dist.tasks.vqa import answer_logits
from spatialnet_dist.text import AnswerVocab, TextVocabs, Vocab, words


def position_questions(images: int, seed: int, size: int, types: tuple[str, ...]):
    """-> {"train"|"held_out": (images (M, 3, S, S), question texts, answers)}: training questions of `types`,
    held-out ones of type position."""
    transform = ImageTransform(size, 3)
    out = {"train": ([], [], []), "held_out": ([], [], [])}
    for s in generate(images, seed):
        qs = [q for q in s.qa if q["type"] in (types if s.split == "train" else ("position",))]
        if not qs:
            continue
        image = transform(s.image)  # (3, S, S)
        part = out["train" if s.split == "train" else "held_out"]
        for q in qs:
            part[0].append(image)
            part[1].append(q["question"])
            part[2].append(q["answer"])
    return {k: (torch.stack(x), q, a) for k, (x, q, a) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--types", default="position", help="comma-separated question types to train on")
    ap.add_argument("--cache", default="", help="a .pt file keeping the prepared questions between runs")
    ap.add_argument("--without-grid-positions", action="store_true", help="zero the fusion's grid positions")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.without_grid_positions:
        heads.grid_positions = lambda n, d, device: torch.zeros(n, d, device=device)
    cfg = ModelConfig(preset="tiny")
    t0 = time.time()
    if args.cache and os.path.exists(args.cache):
        data = torch.load(args.cache)
    else:
        data = position_questions(args.images, args.seed, 128, tuple(args.types.split(",")))
        if args.cache:
            torch.save(data, args.cache)
    texts = data["train"][1]
    vocabs = TextVocabs(
        Vocab.build(Counter(w for t in texts for w in words(t))),
        AnswerVocab(sorted(set(data["train"][2])), cfg.answer_rule),
        classes=[],
    )
    model = build_model(cfg, ["vqa"], vocabs)

    def encode(part):
        x, q, a = data[part]
        question = torch.tensor([vocabs.words.encode(t, cfg.question_max_len, bos_eos=False) for t in q])
        return x, question, torch.tensor([vocabs.answers.stoi[v] for v in a])

    train, held_out = encode("train"), encode("held_out")
    print(f"{len(train[0])} train / {len(held_out[0])} held-out questions, data {time.time() - t0:.0f} s")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    rng = np.random.default_rng(args.seed)

    def accuracy(part) -> float:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([answer_logits(model, x, q, torch.arange(len(q)))  # one question per image row
                                for x, q in zip(part[0].split(128), part[1].split(128))])
        model.train()
        return (logits.argmax(-1) == part[2]).float().mean().item()

    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.from_numpy(rng.choice(len(train[0]), args.batch, replace=False))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 20)
        sub = {"image": train[0][idx], "question": train[1][idx], "image_index": torch.arange(len(idx))}
        logits = model({"vqa": sub})["vqa"]["logits"]
        loss = F.cross_entropy(logits, train[2][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.3f} held-out acc {accuracy(held_out):.3f} ({time.time() - t0:.0f} s)")
    print(f"final: train acc {accuracy(train):.3f}, held-out position acc {accuracy(held_out):.3f}")


if __name__ == "__main__":
    main()
