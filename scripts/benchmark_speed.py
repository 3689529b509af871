#!/usr/bin/env python
"""Speed of Fast EM: per-step time split and the blind / non-blind whole-run ratio.

    python scripts/benchmark_speed.py                       # random ~4M-parameter UNet, 256x256, k=33
    python scripts/benchmark_speed.py --model PATH --steps 100 --particles 1 4 --device cuda

The per-step split times each part alone on the real shapes (UNet forward+backward, M-step incl.
recentring, Pi-GDM guidance vector); "rest" is the measured whole blind step minus those parts
(scheduler step, padding, bookkeeping). The ratio compares the same pipeline run blind and with
the true kernel (paper: 9 s / 5 s = 1.8 on an A100; our target is <= 1.05).
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.ops import center_kernel, edge_taper_window, fft_blur, motion_kernel, pigdm_guidance


def default_unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def build_pipeline(model: str | None, size: int, kernel_size: int) -> FastEMDeblurPipeline:
    if model:
        return FastEMDeblurPipeline.from_pretrained(model)
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="fixed_small",
                              timestep_spacing="linspace")
    return FastEMDeblurPipeline(default_unet(size), scheduler, KernelEstimator(kernel_size=kernel_size))


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def step_split(pipe, y, kernel, particles, padded_size, device, repeats):
    n_images = y.shape[0]
    x = torch.randn(n_images * particles, 3, padded_size, padded_size, device=device, dtype=pipe.unet.dtype)
    x0 = torch.rand(n_images * particles, 3, padded_size, padded_size, device=device)
    y_pad = torch.nn.functional.pad(y, [0, padded_size - y.shape[-1], 0, padded_size - y.shape[-2]], mode="replicate")  # timing only: any size
    t = torch.tensor(500, device=device)
    sigma = torch.full((n_images,), 10 / 255, device=device)

    def unet_forward_backward():
        xt = x.detach().requires_grad_(True)
        out = pipe.unet(xt, t).sample
        torch.autograd.grad(out.float().square().sum(), xt)

    # the pipeline's default M-step: least squares under the photograph's mask, by warm-started PCG
    observed = edge_taper_window((padded_size, padded_size), 0, device=device, region=(0, 0, *y.shape[-2:]))

    def m_step():
        center_kernel(pipe.kernel_estimator(y_pad, x0, sigma, kernel, r=0.1, mask=observed))

    def guidance():
        pigdm_guidance(y_pad.repeat_interleave(particles, 0), x0, kernel.repeat_interleave(particles, 0),
                       sigma.repeat_interleave(particles), 0.1)

    with torch.enable_grad():
        return {
            "unet_fwd_bwd": timed(unet_forward_backward, device, repeats),
            "m_step": timed(m_step, device, repeats),
            "guidance": timed(guidance, device, repeats),
        }


def whole_run(pipe, y, kernel, steps, particles, blind: bool, guidance: str = "pigdm", precision=None) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    pipe(y, sigma=10, kernel=None if blind else kernel, num_inference_steps=steps, num_particles=particles,
         generator=generator, output_type="pt", kernel_size=kernel.shape[-1], guidance=guidance, precision=precision)
    if y.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: random ~4M-param UNet)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kernel_size", type=int, default=33)
    parser.add_argument("--steps", type=int, default=20, help="diffusion steps of the whole-run comparison")
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--guidance", choices=("pigdm", "dps", "diffpir"), default="pigdm",
                        help="E-step of the whole-run comparison (the per-step split always times Pi-GDM's parts)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                        help="UNet autocast of the whole runs (default: the pipeline's, float32)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    pipe = build_pipeline(args.model, args.size, args.kernel_size).to(device)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters())
    sharp = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                                            size=(args.size, args.size), mode="bicubic").clamp(0, 1).to(device)
    kernel = motion_kernel(args.kernel_size, 0.5, 0).to(device)
    y = (fft_blur(sharp, kernel) + 10 / 255 * torch.randn_like(sharp)).clamp(0, 1)
    margin = args.kernel_size  # the pipeline's default boundary margin
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    padded = -(-(args.size + 2 * margin) // multiple) * multiple

    print(f"device={device} threads={torch.get_num_threads()} unet_params={params / 1e6:.2f}M image={args.size}x{args.size} "
          f"(padded {padded}) kernel={args.kernel_size} steps={args.steps} guidance={args.guidance} "
          f"precision={args.precision or 'float32'}")
    print("| particles | UNet fwd+bwd (s) | M-step (s) | guidance (s) | rest (s) | blind step (s) | "
          "non-blind run (s) | blind run (s) | blind/non-blind |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.particles:
        split = step_split(pipe, y, kernel, n, padded, device, args.repeats)
        non_blind = whole_run(pipe, y, kernel, args.steps, n, False, args.guidance, args.precision)
        blind = whole_run(pipe, y, kernel, args.steps, n, True, args.guidance, args.precision)
        per_step = blind / args.steps
        rest = per_step - sum(split.values())
        print(f"| {n} | {split['unet_fwd_bwd']:.4f} | {split['m_step']:.4f} | {split['guidance']:.4f} | {rest:.4f} | "
              f"{per_step:.4f} | {non_blind:.2f} | {blind:.2f} | {blind / non_blind:.3f} |", flush=True)


if __name__ == "__main__":
    main()
