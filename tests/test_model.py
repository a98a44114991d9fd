"""SpatialNet-ViT: head shapes, preset sizes, caption search, missing tasks, transfer learning, overfitting."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from spatialnet_dist.batch_format import IMAGE_KEY, IMAGE_ROW, IMAGES, micro_batch, task_images
from spatialnet_dist.config import LossConfig, ModelConfig
from spatialnet_dist.errors import UserError
from spatialnet_dist.model.spatialnet import assemble_model, build_model
from spatialnet_dist.networks.encoder import build_encoder, meta_encoder
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.networks.presets import PRESETS
from spatialnet_dist.objective import MultiTaskObjective
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from spatialnet_dist.tasks.captioning import generate
from spatialnet_dist.text import BOS_ID, EOS_ID, PAD_ID, AnswerVocab, TextVocabs, Vocab

SIZES = VocabSizes(words=40, answers=7, classes=5)
TINY_WIDTH = meta_encoder("tiny").embed_dim
CFG = ModelConfig(preset="tiny", image_size=32, caption_max_len=10, question_max_len=8)


def tiny_model(tasks=TASKS, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**CFG.__dict__, **overrides})
    return assemble_model(cfg, list(tasks), SIZES)


def make_batch(n: int = 3, seed: int = 0, tasks=TASKS) -> dict:
    """A multi-task batch in the loader's format: captions [BOS w.. EOS PAD..], PAD-padded questions, one per image."""
    g = torch.Generator().manual_seed(seed)
    L, Lq = CFG.caption_max_len, CFG.question_max_len

    def image():
        return torch.randn(n, 3, 32, 32, generator=g)

    tokens = torch.full((n, L), PAD_ID)
    question = torch.full((n, Lq), PAD_ID)
    for i in range(n):
        words = torch.randint(4, SIZES.words, (3 + i % 4,), generator=g)
        tokens[i, : len(words) + 2] = torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])])
        question[i, : 2 + i % 3] = torch.randint(4, SIZES.words, (2 + i % 3,), generator=g)
    batch = {
        "captioning": {"image": image(), "tokens": tokens, "image_index": torch.arange(n)},
        "vqa": {"image": image(), "question": question, "answer": torch.randint(0, SIZES.answers, (n,), generator=g),
                "image_index": torch.arange(n)},
        "classification": {"image": image(), "label": torch.randint(0, SIZES.classes, (n,), generator=g)},
        "regression": {"image": image(), "question": question.flip(0), "count": torch.randint(0, 30, (n,), generator=g).float(),
                       "image_index": torch.arange(n)},
    }
    return {t: batch[t] for t in tasks}


def test_every_head_gives_the_contract_shapes():
    model = tiny_model()
    batch = make_batch(n=3)
    batch["classification"] = {**make_batch(n=5)["classification"]}  # sub-batches may differ in size
    out = model(batch)
    assert out["captioning"]["logits"].shape == (3, CFG.caption_max_len - 1, SIZES.words)
    assert out["vqa"]["logits"].shape == (3, SIZES.answers)
    assert out["classification"]["logits"].shape == (5, SIZES.classes)
    assert out["regression"]["count_log1p"].shape == (3,)
    assert all(torch.isfinite(v).all() for o in out.values() for v in o.values())


def test_forward_encodes_once_and_matches_per_task_forwards():
    model = tiny_model().eval()
    batch = make_batch(n=2)
    calls = []
    handle = model.encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    joint = model(batch)
    handle.remove()
    assert len(calls) == 1
    for task in TASKS:
        alone = model({task: batch[task]})[task]
        for key, value in alone.items():
            torch.testing.assert_close(joint[task][key], value, rtol=1e-4, atol=1e-5)


def test_a_micro_batch_encodes_each_distinct_image_once_with_the_same_outputs_and_gradients():
    # Every task's row i shows image i (as data/order.py arranges for tasks reading the same corpora), except
    # classification's, whose key is empty (a strong crop): micro_batch keeps 3 distinct images + 3 unshared rows.
    batch = make_batch(n=3)
    shared = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for task in TASKS:
        batch[task]["image"] = shared.clone()
        batch[task][IMAGE_KEY] = ["" if task == "classification" else f"synthetic/{i}@0" for i in range(3)]
    micro = micro_batch(batch)
    assert micro[IMAGES].shape == (6, 3, 32, 32) and all("image" not in micro[t] for t in TASKS)
    assert [micro[t][IMAGE_ROW].tolist() for t in TASKS] == [
        [3, 4, 5] if t == "classification" else [0, 1, 2] for t in TASKS]  # captioning first: it shows 0-2
    for task in TASKS:
        torch.testing.assert_close(task_images(micro, task), shared, rtol=0, atol=0)
    alone = {t: {k: v for k, v in sub.items() if k != IMAGE_KEY} for t, sub in batch.items()}  # each its own images
    outputs, grads = [], []
    for b in (micro, alone):
        model = tiny_model().eval()
        encoded = []
        model.encoder.patch_embed.register_forward_hook(lambda module, args, out, seen=encoded: seen.append(args[0].shape[0]))
        out = model(b)
        sum(v.float().sum() for o in out.values() for v in o.values()).backward()
        outputs.append(out)
        grads.append(model.encoder.cls_token.grad.clone())
        assert encoded == [6 if b is micro else 3 * len(TASKS)]  # images through the encoder, in one pass
    for task in TASKS:
        for key, value in outputs[1][task].items():
            torch.testing.assert_close(outputs[0][task][key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_fan_out_gives_the_loss_and_gradients_of_one_question_per_image_row():
    """5 questions (captions) about 2 images against one encoder pass == the 5 questions (captions) each with its
    own copy of the image."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    index = torch.tensor([0, 0, 0, 1, 1])  # (Q,)
    question = torch.randint(4, SIZES.words, (5, CFG.question_max_len), generator=g)
    question[:, 3:] = PAD_ID
    tokens = torch.randint(4, SIZES.words, (5, CFG.caption_max_len), generator=g)  # (C, Lc) captions of varied length
    tokens[:, 0] = BOS_ID
    for c, length in enumerate([3, 5, 4, 6, 2]):
        tokens[c, length:] = PAD_ID
        tokens[c, length] = EOS_ID
    fan_out = {
        "captioning": {"image": images, "tokens": tokens, "image_index": index},
        "vqa": {"image": images, "question": question, "image_index": index,
                "answer": torch.randint(0, SIZES.answers, (5,), generator=g)},
        "regression": {"image": images, "question": question.flip(0), "image_index": index,
                       "count": torch.randint(0, 30, (5,), generator=g).float()},
    }
    single = {t: {**sub, "image": images[index], "image_index": torch.arange(5)} for t, sub in fan_out.items()}
    objective = MultiTaskObjective(LossConfig(weights={"captioning": 1.5, "vqa": 2.0, "regression": 0.5}))
    results = []
    for batch in (fan_out, single):
        model = tiny_model(("captioning", "vqa", "regression")).eval()  # eval: no dropout, the same function twice
        losses = objective(model(batch), batch, model)
        losses["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (fan_losses, fan_grads), (single_losses, single_grads) = results
    assert fan_losses == pytest.approx(single_losses, rel=1e-5)
    assert fan_grads.keys() == single_grads.keys() and "encoder.patch_embed.proj.weight" in fan_grads
    for name in fan_grads:
        torch.testing.assert_close(fan_grads[name], single_grads[name], rtol=1e-4, atol=1e-6)


def test_build_model_sizes_heads_from_the_vocabularies():
    words = Vocab.build({"a": 3, "red": 2, "roof": 1})
    vocabs = TextVocabs(words, AnswerVocab(["yes", "no", "0"], "rsvqa-lr"), ["farm", "forest"])
    model = build_model(CFG, ["captioning", "vqa", "classification"], vocabs)
    assert set(model.heads) == {"captioning", "vqa", "classification"}
    assert model.heads["captioning"].lm_head.out_features == len(words)
    assert model.heads["vqa"].classifier[-1].out_features == 3
    assert model.heads["classification"].fc.out_features == 2


# What each preset's registered encoder must be, as published: (width, depth, heads, MLP width, patch, image size,
# FFN activation). A change here breaks every checkpoint of that preset.
ARCHITECTURES = {
    "tiny": (192, 4, 3, 768, 16, 128, torch.nn.GELU),
    "small": (384, 12, 6, 1536, 16, 256, torch.nn.GELU),
    "paper": (768, 12, 8, 3072, 16, 256, torch.nn.ReLU),
    "base": (768, 12, 12, 3072, 16, 256, torch.nn.GELU),
    "large": (1024, 24, 16, 4096, 16, 256, torch.nn.GELU),
    "giant": (1408, 40, 16, 6144, 16, 256, torch.nn.GELU),
}


def architecture(encoder) -> tuple:
    block = encoder.blocks[0]
    return (encoder.embed_dim, len(encoder.blocks), block.attn.num_heads, block.mlp.fc1.out_features,
            encoder.patch_embed.patch_size[0], encoder.patch_embed.img_size[0], type(block.mlp.act))


def test_importing_the_networks_package_registers_the_presets_with_timm():
    code = "import spatialnet_dist.networks, timm; print(' '.join(timm.list_models('spatialnet_*')))"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert listed == sorted(p.timm_name for p in PRESETS.values())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_timm_builds_each_preset_and_build_encoder_and_the_model_go_through_it(name):
    """On the meta device: shapes, no memory, so giant takes a second."""
    assert set(ARCHITECTURES) == set(PRESETS)
    with torch.device("meta"):
        registered = timm.create_model(PRESETS[name].timm_name)
        model = assemble_model(ModelConfig(preset=name), ["classification"], SIZES)
    assert isinstance(registered, type(model.encoder)) and registered.num_classes == 0
    assert architecture(registered) == architecture(model.encoder) == ARCHITECTURES[name]
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in model.encoder.state_dict().items()}
    assert model.preset is PRESETS[name] and model.heads["classification"].fc.in_features == ARCHITECTURES[name][0]


def test_timm_create_model_takes_timms_usual_arguments():
    encoder = timm.create_model("spatialnet_tiny", img_size=64, in_chans=13, num_classes=0)
    tokens, pooled = encoder.encode(torch.randn(2, 13, 64, 64))
    assert tokens.shape == (2, 16, TINY_WIDTH) and pooled.shape == (2, TINY_WIDTH)
    assert timm.create_model("spatialnet_tiny", num_classes=5)(torch.randn(1, 3, 128, 128)).shape == (1, 5)


def test_paper_encoder_parameter_count_matches_its_dimensions():
    with torch.device("meta"):
        encoder = build_encoder(PRESETS["paper"])
    D, depth, _, H, P, size, _ = architecture(encoder)
    N, C = (size // P) ** 2, 3
    patch = D * C * P * P + D
    tokens = D + (N + 1) * D  # class token + learned positions
    attention = (3 * D * D + 3 * D) + (D * D + D)  # qkv + output projection
    mlp = (D * H + H) + (H * D + D)
    block = 2 * D + attention + 2 * D + mlp  # two LayerNorms
    reference = patch + tokens + depth * block + 2 * D  # + final norm
    count = sum(t.numel() for t in encoder.parameters())
    assert abs(count - reference) / reference < 0.02
    assert 84e6 < count < 88e6


def test_config_overrides_image_size_and_activation():
    model = tiny_model(image_size=48, activation="relu")
    assert model.image_size == 48
    assert isinstance(model.encoder.blocks[0].mlp.act, torch.nn.ReLU)
    tokens, pooled = model.encode(torch.randn(2, 3, 48, 48))
    assert tokens.shape == (2, 9, TINY_WIDTH) and pooled.shape == (2, TINY_WIDTH)


def test_model_command_reports_the_contract_keys(capsys):
    from spatialnet_dist.cli import main

    assert main(["model", "--preset", "paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "paper"
    assert set(info["params"]) == {"encoder", "captioning", "vqa", "classification", "regression", "tagging", "mae",
                                   "total"}
    assert info["params"]["total"] == sum(v for k, v in info["params"].items() if k != "total")
    assert 84e6 < info["params"]["encoder"] < 88e6
    assert info["gflops_per_image"] > 2 * info["params"]["encoder"] * 256 / 1e9  # >= 2 FLOPs/param/token


def test_giant_preset_has_over_a_billion_parameters():
    from spatialnet_dist.model.summary import model_summary

    info = model_summary("giant")
    assert info["params"]["encoder"] > 1e9 and info["params"]["total"] > 1e9


def test_bad_preset_or_image_size_is_a_user_error():
    with pytest.raises(UserError, match="huge"):
        tiny_model(preset="huge")
    with pytest.raises(UserError, match="image_size 40"):
        tiny_model(image_size=40)


def test_beam_search_of_width_one_equals_greedy():
    # A captioner trained for a few steps on captions of 3..6 words ends its captions at varied lengths.
    model = tiny_model(["captioning"])
    batch = make_batch(n=4, tasks=("captioning",))
    objective = MultiTaskObjective(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimizer.zero_grad()
        objective(model(batch), batch)["loss"].backward()
        optimizer.step()
    model.eval()
    images = torch.cat([batch["captioning"]["image"], torch.randn(8, 3, 32, 32)])
    greedy = generate(model, images, beam_size=1, max_len=CFG.caption_max_len)
    decoder = model.heads["captioning"]
    beam = decoder._beam(decoder.project(model.encode(images)[0]), CFG.caption_max_len, 1, 0.6)
    assert beam == greedy
    assert len({len(c) for c in greedy}) > 1 and all(0 < len(c) < CFG.caption_max_len - 1 for c in greedy[:4])
    short = generate(model, images, beam_size=1, max_len=4)  # BOS + at most 3 words
    assert all(s == g[:3] for s, g in zip(short, greedy))


def test_wide_beam_finds_the_best_length_normalised_caption():
    """With more beams than hypotheses, beam search is exhaustive: compare with brute force."""
    torch.manual_seed(1)
    model = assemble_model(CFG, ["captioning"], VocabSizes(words=7, answers=2, classes=2)).eval()
    decoder = model.heads["captioning"]
    decoder.embed.weight.data *= 10  # peaked next-word distributions: greedy and the best caption differ
    max_len, alpha = 5, 0.6  # BOS + up to 4 generated words
    images = torch.randn(4, 3, 32, 32)
    found = generate(model, images, beam_size=128, length_penalty=alpha, max_len=max_len)
    memory = decoder.project(model.encode(images)[0])  # (4, N, Dt)
    best = []
    for b in range(len(images)):
        hypotheses = []  # (length-normalised log-probability, words)
        for n in range(1, max_len):
            seqs = torch.tensor(list(itertools.product([EOS_ID, *range(3, 7)], repeat=n)))  # (M, n)
            with torch.no_grad():
                inputs = torch.cat([torch.full((len(seqs), 1), BOS_ID), seqs[:, :-1]], 1)
                logits = decoder._logits(inputs, memory[b : b + 1].expand(len(seqs), -1, -1)).float()
            logits[..., [PAD_ID, BOS_ID]] = float("-inf")
            logp = F.log_softmax(logits, -1).gather(2, seqs[..., None]).sum((1, 2))  # (M,)
            for words, score in zip(seqs.tolist(), logp.tolist()):
                if EOS_ID in words[:-1] or (words[-1] != EOS_ID and n < max_len - 1):
                    continue  # not a hypothesis: ends before its EOS, or stops short of max_len without one
                hypotheses.append((score / ((5 + n) / 6) ** alpha, [w for w in words if w != EOS_ID]))
        best.append(max(hypotheses, key=lambda h: h[0])[1])
    assert found == best
    assert found != generate(model, images, beam_size=1, max_len=max_len)


def test_a_batch_without_a_task_still_trains():
    model = tiny_model()
    objective = MultiTaskObjective(LossConfig())
    batch = make_batch(tasks=("captioning", "classification", "regression"))
    losses = objective(model(batch), batch, model)
    assert "vqa_loss" not in losses
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("heads.vqa."):
            assert p.grad is None, name
        elif not name.startswith("heads."):  # every encoder weight learns from the tasks present
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.heads["captioning"].decoder.layers[0].linear1.weight.grad.abs().sum() > 0


def test_no_weight_decay_names():
    model = tiny_model()
    names = model.no_weight_decay_names()
    params = dict(model.named_parameters())
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= names
    assert {"heads.captioning.embed.weight", "heads.captioning.pos.weight", "heads.vqa.embed.weight"} <= names
    assert "encoder.blocks.0.attn.qkv.weight" not in names and "heads.classification.fc.weight" not in names
    assert all(params[n].ndim >= 2 for n in params if n not in names)
    assert len(model.decayed_parameters()) == len(params) - len(names & set(params))


def test_activation_checkpointing_gives_the_same_gradients():
    batch = make_batch(n=2, tasks=("classification",))
    grads = []
    for enable in (False, True):
        model = tiny_model(["classification"])
        model.set_grad_checkpointing(enable)
        model(batch)["classification"]["logits"].sum().backward()
        grads.append(model.encoder.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert not PRESETS["tiny"].grad_checkpointing and PRESETS["giant"].grad_checkpointing


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_local_file_loads_into_the_encoder(tmp_path, suffix):
    source = tiny_model(["classification"], seed=1)
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    if suffix == ".pth":
        torch.save({"model": state}, path)  # nested as timm's training scripts save it
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    same = tiny_model(["classification"], seed=2, pretrained=str(path))
    torch.testing.assert_close(same.encoder.state_dict(), source.encoder.state_dict())
    resized = tiny_model(["classification"], seed=2, image_size=64, pretrained=str(path))  # 4x4 -> 8x8 grid
    assert resized.encoder.pos_embed.shape == (1, 1 + 16, TINY_WIDTH)
    torch.testing.assert_close(resized.encoder.blocks[3].mlp.fc2.weight, source.encoder.blocks[3].mlp.fc2.weight)


@pytest.mark.slow  # two ViT-B/16 (86M parameters), their weights written twice (~0.7 GB)
def test_base_preset_is_timm_vit_b16_and_loads_its_weights_as_they_are(tmp_path):
    """A timm vit_base_patch16_224 state dict (random weights, ImageNet head included), written as
    .safetensors and .pth, loads through model.pretrained: at 224 px every encoder weight equals the
    file's and the features equal timm's; at the preset's 256 px pos_embed is resampled 14x14 -> 16x16."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    assert PRESETS["base"].hub_name.split(".")[0] == "vit_base_patch16_224"
    assert PRESETS["base"].hub_name in timm.list_pretrained("vit_base_patch16_224*")
    torch.manual_seed(3)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    state = vit_b.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vit_b16.safetensors"))
    torch.save(state, tmp_path / "vit_b16.pth")
    encoder_keys = set(state) - {"head.weight", "head.bias"}
    encoder = tiny_model(["classification"], preset="base", image_size=224,
                         pretrained=str(tmp_path / "vit_b16.safetensors")).encoder.eval()
    loaded = encoder.state_dict()
    assert set(loaded) == encoder_keys
    assert all(torch.equal(loaded[k], state[k]) for k in encoder_keys)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(image), vit_b.forward_features(image))

    at_256 = tiny_model(["classification"], preset="base", image_size=0, pretrained=str(tmp_path / "vit_b16.pth"))
    assert at_256.encoder.patch_embed.grid_size == (16, 16)
    resized = at_256.encoder.state_dict()
    torch.testing.assert_close(resized["pos_embed"], resample_abs_pos_embed(state["pos_embed"], (16, 16)))
    assert all(torch.equal(resized[k], state[k]) for k in encoder_keys - {"pos_embed"})


def test_freeze_encoder_blocks_fixes_the_stem_and_the_first_blocks():
    def frozen(n: int) -> set[str]:
        return {name for name, p in tiny_model(freeze_encoder_blocks=n).named_parameters() if not p.requires_grad}

    names = [name for name, _ in tiny_model().named_parameters()]
    stem = ("encoder.patch_embed.", "encoder.pos_embed", "encoder.cls_token")
    assert frozen(0) == set()
    assert frozen(2) == {n for n in names if n.startswith((*stem, "encoder.blocks.0.", "encoder.blocks.1."))}
    depth = len(meta_encoder("tiny").blocks)
    trainable_encoder = {n for n in names if n.startswith("encoder.")} - frozen(depth)
    assert trainable_encoder == {"encoder.norm.weight", "encoder.norm.bias"}  # the whole trunk but its final norm
    with pytest.raises(ValueError, match=f"{depth + 1} of {depth}"):
        tiny_model(freeze_encoder_blocks=depth + 1)


def test_layer_decay_scales_follow_the_depth():
    scales = tiny_model().lr_scales(0.5)  # tiny: 4 blocks
    assert scales["encoder.blocks.3.mlp.fc1.weight"] == 0.5 and scales["encoder.blocks.0.attn.qkv.bias"] == 0.5**4
    assert scales["encoder.pos_embed"] == scales["encoder.cls_token"] == scales["encoder.patch_embed.proj.weight"] == 0.5**5
    assert scales["encoder.norm.weight"] == 1.0
    assert all(v == 1.0 for k, v in scales.items() if k.startswith("heads."))
    assert set(tiny_model().lr_scales(1.0).values()) == {1.0}


def test_pretrained_accepts_a_spatialnet_state_dict(tmp_path):
    source = tiny_model(seed=1)
    torch.save(source.state_dict(), tmp_path / "spatialnet.pt")
    model = tiny_model(["vqa"], seed=2, pretrained=str(tmp_path / "spatialnet.pt"))
    torch.testing.assert_close(model.encoder.state_dict(), source.encoder.state_dict())


def test_pretrained_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=str(missing)):
        tiny_model(pretrained=str(missing))
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no ViT encoder weights"):
        tiny_model(pretrained=str(tmp_path / "other.pth"))
    wider = build_encoder(PRESETS["small"], image_size=32)
    torch.save(wider.state_dict(), tmp_path / "small.pth")
    with pytest.raises(UserError, match="expects"):
        tiny_model(pretrained=str(tmp_path / "small.pth"))
    with pytest.raises(UserError, match="no published timm weights"):
        tiny_model(pretrained="hub")


def test_pretrained_hub_offline_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unreachable") as err:  # conftest sets HF_HUB_OFFLINE=1
        tiny_model(["classification"], preset="small", pretrained="hub")
    assert "\n" not in str(err.value)


def test_tiny_model_overfits_one_multitask_batch():
    """Every task's loss falls by >= 90% within 300 AdamW steps on one fixed batch."""
    model = tiny_model()
    objective = MultiTaskObjective(LossConfig())
    batch = make_batch(n=4, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        losses = objective(model(batch), batch, model)
        current = {t: losses[f"{t}_loss"].item() for t in TASKS}
        first = first or current
        if all(current[t] <= 0.1 * first[t] for t in TASKS):
            break
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert all(current[t] <= 0.1 * first[t] for t in TASKS), (first, current)


def test_vqa_fusion_ties_side_words_to_image_positions():
    """The VQA head alone learns "is the bright square on the <side>?" from 8 x 8 token grids that differ only
    in where a 3 x 3 square lies (wholly in one half): only the grid positions on its image memory say where."""
    from spatialnet_dist.networks.heads import VQAHead

    torch.manual_seed(0)
    sides = {4: (1, 0), 5: (1, 1), 6: (0, 0), 7: (0, 1)}  # word id -> (axis: 0 rows 1 columns, which half)
    preset = dataclasses.replace(PRESETS["tiny"], text_dim=32, text_heads=2)  # small: seconds on one core
    head = VQAHead(16, preset, vocab_size=8, num_answers=2, max_len=2)
    ground, square = torch.randn(2, 16)  # (D,) each: how ground and the bright square look to the encoder

    def batch(n: int):
        starts = torch.tensor([0, 1, 4, 5])  # top-left corner: the square stays inside one half
        row, col = starts[torch.randint(0, 4, (n,))], starts[torch.randint(0, 4, (n,))]
        tokens = ground + 0.1 * torch.randn(n, 8, 8, 16)  # (n, rows, cols, D)
        for i in range(n):
            tokens[i, row[i] : row[i] + 3, col[i] : col[i] + 3] = square
        word = torch.randint(4, 8, (n,))
        axis, half = (torch.tensor([sides[int(w)][i] for w in word]) for i in (0, 1))
        answer = (torch.where(axis == 0, row, col) >= 4).long() == half
        question = torch.stack([word, torch.full_like(word, PAD_ID)], 1)  # (n, 2)
        return tokens.view(n, 64, 16), question, answer.long()

    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(200):
        tokens, question, answer = batch(32)
        loss = F.cross_entropy(head.answer(head.image_memory(tokens), question), answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, question, answer = batch(512)
    with torch.no_grad():
        accuracy = (head.answer(head.image_memory(tokens), question).argmax(-1) == answer).float().mean()
    assert accuracy >= 0.95, accuracy


def test_count_head_sums_a_density_over_the_tokens():
    """The head learns in 200 steps to count 0-40 tokens of the asked-for kind among 64, another kind mixed in:
    a per-token density summed, so it generalises to every count at once."""
    from spatialnet_dist.networks.heads import CountRegressionHead

    torch.manual_seed(0)
    head = CountRegressionHead(16, vocab_size=6, question_dim=8, hidden=32)
    ground, cars, trees = torch.randn(3, 16)  # (D,) each: how they look to the encoder

    def batch(n: int):
        count = torch.randint(0, 41, (n,))
        tokens = ground + 0.1 * torch.randn(n, 64, 16)  # (n, N, D)
        for i in range(n):
            where = torch.randperm(64)
            tokens[i, where[: count[i]]] = cars
            tokens[i, where[40:]] = trees  # up to 24 other things, never counted
        question = torch.tensor([[4, 5]]).expand(n, 2)  # "how many cars"
        return tokens, {"question": question, "image_index": torch.arange(n)}, count.float()

    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(200):
        tokens, sub, count = batch(32)
        loss = F.mse_loss(head(tokens, None, sub)["count_log1p"], torch.log1p(count))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, sub, count = batch(256)
    with torch.no_grad():
        predicted = torch.expm1(head(tokens, None, sub)["count_log1p"])
    assert (predicted - count).abs().mean() < 1.0


def test_conv_stem_gives_the_patch_grid_and_the_rest_of_a_timm_vit(tmp_path):
    """model.stem=conv: log2(patch) stride-2 3x3 convolutions to the same (B, N, D) tokens as the patch conv;
    blocks, tokens and norms keep timm's names, so a patch ViT's weights load into all but the stem."""
    patch, conv = tiny_model(["classification"], seed=1), tiny_model(["classification"], seed=2, stem="conv")
    x = torch.randn(2, 3, 32, 32)
    assert patch.encode(x)[0].shape == conv.encode(x)[0].shape == (2, 4, TINY_WIDTH)
    convs = [m for m in conv.encoder.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (2, 2))] * 4 + [((1, 1), (1, 1))]  # patch 16
    assert [c.out_channels for c in convs] == [24, 48, 96, 192, 192]
    shared = set(patch.encoder.state_dict()) & set(conv.encoder.state_dict())
    assert {k for k in conv.encoder.state_dict() if k not in shared} == {
        k for k in conv.encoder.state_dict() if k.startswith("patch_embed.proj.")}
    stem_before = {k: v.clone() for k, v in conv.encoder.patch_embed.state_dict().items()}
    path = str(tmp_path / "patch-vit.pth")
    torch.save(patch.encoder.state_dict(), path)
    loaded = tiny_model(["classification"], seed=2, stem="conv", pretrained=path)
    torch.testing.assert_close({k: loaded.encoder.state_dict()[k] for k in shared if "patch_embed" not in k},
                               {k: patch.encoder.state_dict()[k] for k in shared if "patch_embed" not in k})
    torch.testing.assert_close(loaded.encoder.patch_embed.state_dict(), stem_before)  # the stem starts fresh


def test_patch_size_sets_the_token_grid_and_is_checked_against_the_image_size():
    from spatialnet_dist.config import ConfigError, load

    model = tiny_model(["classification"], patch_size=8)
    assert model.encode(torch.randn(1, 3, 32, 32))[0].shape == (1, 16, TINY_WIDTH)
    assert load(overrides=["model.image_size=72", "model.patch_size=8"]).model.patch_size == 8
    with pytest.raises(ConfigError, match="model.image_size: 72 is not a multiple of the patch size 16"):
        load(overrides=["model.image_size=72"])
    with pytest.raises(ConfigError, match="model.stem: conv .* 12 is not a power of 2"):
        load(overrides=["model.image_size=96", "model.patch_size=12", "model.stem=conv"])
    with pytest.raises(ConfigError, match="model.stem"):
        load(overrides=["model.stem=resnet"])


def test_global_pool_avg_pools_the_normalised_patch_tokens_with_the_class_token_models_parameters():
    """model.global_pool: token -> the class token after the final norm; avg -> the mean of the (normalised)
    patch tokens the heads also read. The same parameter names and shapes: weights load either way."""
    from spatialnet_dist.config import ConfigError, load

    token, avg = tiny_model(["classification"], seed=3), tiny_model(["classification"], seed=3, global_pool="avg")
    assert {k: v.shape for k, v in token.state_dict().items()} == {k: v.shape for k, v in avg.state_dict().items()}
    avg.load_state_dict(token.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = token.encoder.forward_features(x)  # (B, 1 + N, D), after the final norm
        tokens, pooled = token.encode(x)
        avg_tokens, avg_pooled = avg.encode(x)
    torch.testing.assert_close(pooled, features[:, 0])
    torch.testing.assert_close(avg_tokens, tokens)
    torch.testing.assert_close(avg_pooled, tokens.mean(1))  # (B, D)
    assert not torch.allclose(avg_pooled, pooled)
    with pytest.raises(ConfigError, match="model.global_pool"):
        load(overrides=["model.global_pool=max"])
