"""The CLIP teacher's image tower runs in fp32 on a CPU whatever the model's dtype (CPU bf16 autocast costs
seconds per batch there: docs/upstream/pytorch-cpu-bf16-linear-bmm.md), and what stores its embeddings says so."""
import torch
import torch.nn.functional as F


def test_teacher_runs_fp32_on_cpu_under_a_bf16_model(tiny_dir):
    import dinov2clip

    enc = dinov2clip.load_encoders(str(tiny_dir), device="cpu", dtype="bf16", teacher=True)
    assert enc.dtype == torch.bfloat16 and enc.teacher_dtype == torch.float32
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stock = F.normalize(enc.teacher.encode_image(x).float(), dim=-1)  # open_clip's own, in fp32
    assert torch.equal(enc.encode_teacher(x), stock)
