"""Text heatmaps: the pointing game on synthetic scenes, and the cost of a map against embedding the image.

    python benchmarks/bench_heatmap.py --head --docs docs/heatmaps.md   # 300 scenes, cost at reference size
    python benchmarks/bench_heatmap.py --quick                    # CI: 100 scenes, cost on the demo model
    python benchmarks/bench_heatmap.py --model runs/scenes/train/model --scenes 500

Scenes: two or three shapes of different colours at random places and sizes (inside the centre crop the model
sees, boxes apart) on varied backgrounds (dark, light, a gradient, noise), in square, wide and tall images.
Each scene queries one of its shapes by its caption ("a red circle"). A map *points* when its peak lies inside
the queried shape's box. Chance: the share of the crop the box covers. Model: the demo model trained by
`training/configs/scenes.yaml` (built under --work unless --model is given).

Compared: every method of dinov2clip.heatmap.METHODS and the variants tried and not shipped (VARIANTS below, each
a method function); `--docs` writes the results as a generated markdown page, `--out` as JSON.

Cost: seconds for the maps of 25 images, as a ratio to embedding the same 25 images (`encode_image` from files),
on this machine, median of --repeats; with --cost-model (default: a reference-size random model, dinov2-base +
ViT-B/16 + 768→2048×6→512, built under --work) unless --quick."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def points(heatmap: np.ndarray, box) -> bool:
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x, y = col + 0.5, row + 0.5
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def chance(box, crop) -> float:
    return (box[2] - box[0]) * (box[3] - box[1]) / ((crop[2] - crop[0]) * (crop[3] - crop[1]))


# -- variants tried and not shipped: method functions as dinov2clip.heatmap.METHODS holds them ---------------
def _score(model, cls, pooled_patches, text):
    """Text score of projector(pool(CLS, x)) for each [B, P, H] row x."""
    import torch.nn.functional as F

    from dinov2clip.dinov2 import pool

    b, p, h = pooled_patches.shape
    x = pool(cls[:, None].expand(b, p, cls.shape[-1]), pooled_patches, model.image_encoder.pooling, p)
    return F.normalize(model.projector(x.reshape(b * p, -1)).float(), dim=-1).matmul(text).reshape(b, p)


def integrated_gradients(model, cls, patches, text, grid, steps: int = 8):
    """Integrated gradients of the text score over the patch tokens, from all-zero tokens (8 steps)."""
    import torch
    import torch.nn.functional as F

    from dinov2clip.dinov2 import pool

    total = torch.zeros_like(patches)
    for a in (torch.arange(steps) + 0.5) / steps:
        x = (a * patches).detach().requires_grad_(True)
        with torch.enable_grad():
            pooled = pool(cls, x.mean(dim=1), model.image_encoder.pooling, x.shape[1])
            score = (F.normalize(model.projector(pooled).float(), dim=-1) @ text).sum()
            (grad,) = torch.autograd.grad(score, x)
        total += grad
    return (total / steps * patches).sum(dim=-1)


def occlusion(model, cls, patches, text, grid):
    """The drop of the text score when a patch's 3×3 neighbourhood leaves the patch mean."""
    from dinov2clip.heatmap import neighbourhoods

    p = patches.shape[1]
    rest = (patches.sum(dim=1, keepdim=True) - 9 * neighbourhoods(patches, grid)) / (p - 9)
    return -_score(model, cls, rest, text)


def extrapolated(model, cls, patches, text, grid):
    """`patch` pushed past the patch: the patch mean moved twice the way from it to the patch."""
    mean = patches.mean(dim=1, keepdim=True)
    return _score(model, cls, mean + 2 * (patches - mean), text)


def window(model, cls, patches, text, grid):
    """`patch` with each patch's 3×3 neighbourhood (the mean of its tokens, before the projector) in place of the
    one patch (the default before `smoothed`, which averages after the projector)."""
    from dinov2clip.heatmap import METHODS, neighbourhoods

    return METHODS["patch"](model, cls, neighbourhoods(patches, grid), text)


def contrasted(method: str, others):
    """`method` scored for the text minus the mean embedding of `others` (here: every caption the scenes use),
    so the map is about "red circle" rather than "a shape". Needs a caption vocabulary the product lacks."""
    from dinov2clip.heatmap import METHODS

    def score(model, cls, patches, text, grid):
        return {**METHODS, **VARIANTS}[method](model, cls, patches, text - others(model).to(text), grid)
    score.__doc__ = f"`{method}` scored for the text minus the mean embedding of every caption the scenes use."
    return score


def patch_head(model, images: int = 1200, epochs: int = 10, seed: int = 0):
    """A trained method: an MLP on each token whose mean over CLS and patches reproduces the projector's output on
    the pooled vector (consistency loss, MSE + cosine), trained on the tokens of the demo model's own kind of
    training images (one shape, scenes.yaml's sizes and backgrounds); a patch's score is its output's text score."""
    import torch
    import torch.nn.functional as F

    from dinov2clip.dinov2 import pool
    from training.pipeline import load_config
    from training.synthetic import COLOURS, SHAPES, shape_image

    opts = load_config("scenes")["data"]["shapes"]  # the demo model's own kind of training images
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    pixels = torch.stack([model.preprocess(shape_image(
        rng, list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))], opts["image_size"],
        tuple(opts.get("scale", (0.2, 0.4))), tuple(opts.get("backgrounds", ("dark",))))) for _ in range(images)])
    with torch.inference_mode(False), torch.no_grad():
        cls, patches = zip(*(model.image_encoder.tokens(pixels[i:i + 100]) for i in range(0, images, 100)))
        cls, patches = torch.cat(cls).float().clone(), torch.cat(patches).float().clone()
        target = model.projector(pool(cls, patches.mean(dim=1), model.image_encoder.pooling, patches.shape[1])).float()
    tokens = torch.cat([cls[:, None], patches], dim=1)
    h, d = tokens.shape[-1], target.shape[-1]
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(h, 128), torch.nn.GELU(), torch.nn.Linear(128, d))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(images, generator=gen).split(100):
                out = head(tokens[idx]).mean(dim=1)
                loss = F.mse_loss(out, target[idx]) + (1 - F.cosine_similarity(out, target[idx])).mean()
                opt.zero_grad(), loss.backward(), opt.step()
    head.requires_grad_(False)

    def score(model, cls, patches, text, grid):
        return F.normalize(head(patches), dim=-1) @ text
    score.__doc__ = patch_head.__doc__.split(";")[0] + "."
    return score


def _caption_mean(model, cache={}):
    from training.synthetic import COLOURS, SHAPES

    if id(model) not in cache:
        cache[id(model)] = model.encode_text([f"a {c} {s}" for c in COLOURS for s in SHAPES]).float().mean(dim=0)
    return cache[id(model)]


VARIANTS = {
    "integrated-gradients": integrated_gradients,
    "occlusion": occlusion,
    "window": window,
    "patch-extrapolated": extrapolated,
    "patch-contrast": contrasted("patch", _caption_mean),
    "window-contrast": contrasted("window", _caption_mean),
}


def pointing_game(model, scenes, methods) -> dict:  # scenes: training.synthetic.scene
    """{method: share of scenes whose map peaks inside the queried box}, chance included; one query per scene."""
    hits = {m: 0 for m in methods}
    for img, caption, box, _ in scenes:
        for m in methods:
            hits[m] += points(model.heatmap([img], caption, method=VARIANTS.get(m, m))[0], box)
    result = {"chance": float(np.mean([chance(b, c) for _, _, b, c in scenes]))}
    result.update({m: hits[m] / len(scenes) for m in methods})
    return result


def cost(model, files, methods, repeats: int) -> dict:
    """{"embed": s, method: s} for all `files`: median of `repeats` runs after one warm-up."""
    def timed(fn):
        fn()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    text = "a red circle"
    result = {"embed": timed(lambda: model.encode_image(files))}
    for m in methods:
        result[m] = timed(lambda: model.heatmap(files, text, method=m))
    return result


def demo_model(work: Path, quick: bool) -> Path:
    from training.pipeline import load_config, run_pipeline

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "training" / "configs" / "scenes.yaml")
    out = work / "scenes"
    run_pipeline(cfg, out, progress=False)
    return out / "train" / "model"


def main(argv=None) -> int:
    from dinov2clip.heatmap import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI: fewer scenes, cost on the demo model only")
    p.add_argument("--model", help="a trained demo model directory (default: train one under --work)")
    p.add_argument("--cost-model", help="the model to time (default: a reference-size random one under --work)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dinov2clip-bench-heatmap"))
    p.add_argument("--scenes", type=int, default=None)
    p.add_argument("--hits", type=int, default=25, help="images per cost run [%(default)s]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=[*METHODS, *VARIANTS], choices=[*METHODS, *VARIANTS])
    p.add_argument("--head", action="store_true", help="also train and compare a patch head (a trained method)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--docs", help="write the results as a generated markdown page here (docs/heatmaps.md)")
    args = p.parse_args(argv)
    n = args.scenes or (100 if args.quick else 300)
    work = Path(args.work)

    import torch

    import dinov2clip
    from training.synthetic import scene

    torch.set_num_threads(torch.get_num_threads())
    model_dir = Path(args.model) if args.model else demo_model(work, args.quick)
    model = dinov2clip.load(str(model_dir), device="cpu", dtype="fp32")
    rng = np.random.default_rng(args.seed)
    scenes = [scene(rng) for _ in range(n)]  # drawn by the same code as the demo model's training images
    methods = args.methods
    if args.head:
        VARIANTS["head"] = patch_head(model)
        methods = [*methods, "head"]
    game = pointing_game(model, scenes, methods)
    print(f"pointing game: {n} scenes, model {model_dir}")
    print(f"  {'method':<22}{'points':>8}")
    for m, v in game.items():
        print(f"  {m:<22}{100 * v:>7.1f}%")

    files_dir = work / "cost-images"
    files_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, *_rest) in enumerate(scenes[: args.hits]):
        path = files_dir / f"scene{i}.png"
        img.resize((img.width * 4, img.height * 4)).save(path)  # 512-640 px, as photos are
        files.append(str(path))
    if not args.quick:
        from fixtures import reference_model_dir

        model = dinov2clip.load(str(reference_model_dir(args.cost_model, work)), device="cpu", dtype="fp32")
    times = cost(model, files, [m for m in args.methods if m in METHODS], args.repeats)  # what ships is timed
    size = "demo" if args.quick else "reference-size"
    print(f"cost: {len(files)} images, {torch.get_num_threads()} threads, model {size}")
    print(f"  {'':<12}{'seconds':>9}{'× embed':>9}")
    for m, t in times.items():
        print(f"  {m:<12}{t:>9.2f}{t / times['embed']:>9.2f}")
    command = ["python", "benchmarks/bench_heatmap.py", *(argv if argv is not None else sys.argv[1:])]
    results = {"command": " ".join(command), "cpu": cpu_name(), "threads": torch.get_num_threads(), "scenes": n,
               "seed": args.seed, "pointing": game, "cost": {"images": len(files), "model": size, "seconds": times}}
    if args.out:
        write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
    if args.docs:
        plot(results, Path(args.docs).parent / PLOT)
        write_text(Path(args.docs), markdown(results))
    return 0


PLOT = "images/heatmaps-pointing.png"  # beside the generated page


def plot(r: dict, path: Path) -> None:
    """The pointing game as bars, one per method (shipped ones dark), with chance and the 80 % goal marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinov2clip.atomic import atomic_path
    from dinov2clip.heatmap import METHODS

    names = [m for m in r["pointing"] if m != "chance"]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(names[::-1], [100 * r["pointing"][m] for m in names[::-1]],
            color=["#333" if m in METHODS else "#aaa" for m in names[::-1]])
    ax.axvline(100 * r["pointing"]["chance"], color="#c33", ls=":", label="chance")
    ax.axvline(80, color="#36c", ls="--", label="goal (80 %)")
    ax.set_xlim(0, 100), ax.set_xlabel(f"% of {r['scenes']} scenes whose map peaks on the queried shape")
    ax.legend(loc="lower right", fontsize=8), fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown"


def write_text(path: Path, text: str) -> None:
    from dinov2clip.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def markdown(r: dict) -> str:
    from dinov2clip.heatmap import DEFAULT_METHOD, METHODS

    def row(name):
        v = r["pointing"][name]
        shipped = "chance" if name == "chance" else ("shipped" + (", default" if name == DEFAULT_METHOD else "")
                                                     if name in METHODS else "tried, not shipped")
        t = r["cost"]["seconds"].get(name)
        ratio = f"{t / r['cost']['seconds']['embed']:.2f}×" if t is not None else ""
        doc = ("" if name == "chance" else "dinov2clip/heatmap.py" if name in METHODS
               else " ".join((VARIANTS[name].__doc__ or "").split()))
        return f"| {name} | {shipped} | {100 * v:.1f} % | {ratio} | {doc} |"

    c = r["cost"]
    shipped = {m: v for m, v in r["pointing"].items() if m in METHODS}
    best = max(shipped, key=shipped.get) if shipped else None
    return "\n".join([
        "# Text heatmaps: pointing game and cost",
        "",
        "Generated by `benchmarks/bench_heatmap.py`; do not edit by hand. Command:",
        "",
        f"    {r['command']}",
        "",
        f"CPU: {r['cpu']} ({r['threads']} threads). Pointing game: {r['scenes']} synthetic scenes (seed {r['seed']}), "
        "two or three shapes of different colours on dark, light, gradient or noise backgrounds; the map *points* "
        "when its peak lies inside the queried shape's box; chance is the share of the crop that box covers. "
        "Model: the heatmap demo model trained by `training/configs/scenes.yaml`. Methods: `dinov2clip/heatmap.py`; the "
        "variants tried and not shipped: `VARIANTS` in the benchmark.",
        "",
        f"Cost: seconds for the maps of {c['images']} images (512-640 px files) against embedding the same images "
        f"(`encode_image`), median of the runs, {c['model']} model"
        + (" (random weights: dinov2-base + ViT-B/16 + 768→2048×6→512)" if c["model"] == "reference-size" else "")
        + f"; embedding took {c['seconds']['embed']:.2f} s.",
        "",
        f"Goal (issue 22): the peak inside the queried box in at least 80 % of scenes. Best shipped method here: "
        f"`{best}`, {100 * shipped[best]:.1f} % (chance {100 * r['pointing']['chance']:.1f} %)." if best else "",
        "",
        f"![the pointing game, one bar per method: shipped dark, tried grey]({PLOT})",
        "",
        "| method | status | points | cost × embed | what |",
        "|---|---|---|---|---|",
        *[row(name) for name in r["pointing"]],
        "",
        "```json",
        json.dumps(r, indent=2),
        "```",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
