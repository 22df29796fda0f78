"""Text heatmaps: the pointing game on synthetic scenes, and the cost of a map against embedding the image.

    python benchmarks/bench_heatmap.py                     # 300 scenes + cost at reference size (builds both models)
    python benchmarks/bench_heatmap.py --quick             # CI: 100 scenes, cost on the demo model
    python benchmarks/bench_heatmap.py --model runs/tiny/train/model --scenes 500

Scenes: two or three shapes of different colours at random places and sizes (inside the centre crop the model
sees, boxes apart) on varied backgrounds (dark, light, a gradient, noise), in square, wide and tall images.
Each scene queries one of its shapes by its caption ("a red circle"). A map *points* when its peak lies inside
the queried shape's box. Chance: the share of the crop the box covers. Model: the demo model trained by
`training/configs/tiny.yaml` (built under --work unless --model is given).

Cost: seconds for the maps of 25 images, as a ratio to embedding the same 25 images (`encode_image` from files),
on this machine, median of --repeats; with --cost-model (default: a reference-size random model, dinov2-base +
ViT-B/16 + 768→2048×6→512, built under --work) unless --quick."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKGROUNDS = ("dark", "light", "gradient", "noise")
SIZES = ((128, 128), (160, 128), (128, 160))


def scene(rng: np.random.Generator, crop_share: float = 224 / 256):
    """→ (PIL image, caption of the queried shape, its box (x0, y0, x1, y1), the crop box)."""
    from PIL import Image

    from training.synthetic import COLOURS, SHAPES

    w, h = SIZES[rng.integers(len(SIZES))]
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "noise":
        arr = rng.integers(0, 256, (h, w, 3))
    elif kind == "gradient":
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        arr = np.broadcast_to(a + t * (b - a), (h, w, 3))
    else:
        lo = 0 if kind == "dark" else 170
        arr = np.broadcast_to(rng.integers(lo, lo + 86, 3), (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8))
    side = min(w, h) * crop_share
    cx0, cy0 = (w - side) / 2, (h - side) / 2
    crop = (cx0, cy0, cx0 + side, cy0 + side)
    colours = rng.permutation(list(COLOURS))[: rng.integers(2, 4)]
    boxes, captions = [], []
    for colour in colours:
        shape = SHAPES[rng.integers(len(SHAPES))]
        for _ in range(100):  # a place whose box overlaps no earlier box
            r = rng.uniform(0.1, 0.2) * side
            x, y = rng.uniform(cx0 + r, cx0 + side - r), rng.uniform(cy0 + r, cy0 + side - r)
            box = (x - r, y - r, x + r, y + r)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        draw(img, colour, shape, x, y, r)
        boxes.append(box), captions.append(f"a {colour} {shape}")
    q = rng.integers(len(boxes))
    return img, captions[q], boxes[q], crop


def draw(img, colour: str, shape: str, x: float, y: float, r: float) -> None:
    """A shape of radius `r` centred at (x, y), as training.synthetic draws its shapes."""
    from PIL import ImageDraw

    from training.synthetic import COLOURS

    d, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def points(heatmap: np.ndarray, box) -> bool:
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x, y = col + 0.5, row + 0.5
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def chance(box, crop) -> float:
    return (box[2] - box[0]) * (box[3] - box[1]) / ((crop[2] - crop[0]) * (crop[3] - crop[1]))


def pointing_game(model, scenes, methods) -> dict:
    """{method: share of scenes whose map peaks inside the queried box}, chance included; one query per scene."""
    hits = {m: 0 for m in methods}
    for img, caption, box, _ in scenes:
        for m in methods:
            hits[m] += points(model.heatmap([img], caption, method=m)[0], box)
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
    cfg = load_config(root / "training" / "configs" / "tiny.yaml")
    out = work / "tiny"
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
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args(argv)
    n = args.scenes or (100 if args.quick else 300)
    work = Path(args.work)

    import torch

    import dinov2clip

    torch.set_num_threads(torch.get_num_threads())
    model_dir = Path(args.model) if args.model else demo_model(work, args.quick)
    model = dinov2clip.load(str(model_dir), device="cpu", dtype="fp32")
    rng = np.random.default_rng(args.seed)
    scenes = [scene(rng) for _ in range(n)]
    game = pointing_game(model, scenes, args.methods)
    print(f"pointing game: {n} scenes, model {model_dir}")
    print(f"  {'method':<12}{'points':>8}")
    for m, v in game.items():
        print(f"  {m:<12}{100 * v:>7.1f}%")

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
    times = cost(model, files, args.methods, args.repeats)
    print(f"cost: {len(files)} images, {torch.get_num_threads()} threads, model {'demo' if args.quick else 'reference-size'}")
    print(f"  {'':<12}{'seconds':>9}{'× embed':>9}")
    for m, t in times.items():
        print(f"  {m:<12}{t:>9.2f}{t / times['embed']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
