"""The registry of deblurring methods used by ``diffusers-blind deblur`` and the evaluation.

A method is one small [`Method`] record: its name, what it loads (a pipeline class and a default
model folder, or nothing), whether it needs the true kernel, whether it returns a kernel, and its
options (call arguments with their command-line flags). The command line builds ``--method`` and its
flags from this registry, and the evaluation runs any registered method, so adding a method is::

    from diffusers_blind.methods import Method, MethodResult, Option, register_method

    def run(y, *, sigma, kernel, generator, pipeline, blur, strength):
        return MethodResult(image=y.clamp(0, 1) ** strength, kernel=None)

    register_method(Method("gamma", run, options=(Option("strength", float, 1.0, "the exponent"),)))

The run function receives ``y``, the blurry ``(1, C, H, W)`` float tensor in ``[0, 1]`` on the device;
``sigma``, the noise std in 8-bit levels or ``"auto"``; ``kernel``, the true ``(1, 1, k, k)`` kernel or
``None``; ``generator``; ``pipeline``, the loaded pipeline (``None`` for methods without one); ``blur``,
how ``y`` was blurred (``"circular"``: periodic FFT blur, the papers' protocol; ``"valid"`` or
``None``: a real photograph's boundary); and one keyword per option. It returns a [`MethodResult`].
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


# ---------------------------------------------------------------------------- argument types
def positive_int(value) -> int:
    """An integer ≥ 1 (argparse type)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    if number < 1 or str(number) != str(value).strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def kernel_size_or_auto(value) -> int | str:
    """A positive integer, or ``"auto"`` (argparse type of ``--kernel-size``)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def on_off(value) -> bool:
    """``on``/``off`` (also ``true``/``false``, ``1``/``0``; argparse type)."""
    text = str(value).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


FASTEM_KERNEL_INITS = ("sparse", "dirac")  # the Fast EM pipeline's string starts (its KERNEL_INITS)
BLIND_DPS_KERNEL_INITS = ("noise", "sparse")  # the BlindDPS pipeline's (its KERNEL_INITS)
KERNEL_START_NAMES = ("sparse", "dirac", "noise")


def kernel_init_arg(value) -> str:
    """A string start of a blind method's kernel, ``sparse``, ``dirac`` or ``noise`` (argparse type of
    ``--kernel-init``; which ones a method takes is checked with the method's options)."""
    text = str(value).strip().lower()
    if text not in KERNEL_START_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(KERNEL_START_NAMES)}, got {value!r}")
    return text


def _kernel_init_check(method: str, allowed: tuple[str, ...]):
    """A ``check_options`` that refuses a ``--kernel-init`` the method has no use for."""
    def check(options) -> None:
        value = options.get("kernel_init")
        if value is not None and value not in allowed:
            raise ValueError(f"--kernel-init {value} is not a start of {method} (it takes {' or '.join(allowed)})")
    return check


def tile_size_arg(value):
    """A tile side in pixels (an integer >= 8) or ``auto`` (``None``: chosen from the memory budget)."""
    if str(value).strip().lower() == "auto":
        return None
    number = positive_int(value)
    if number < 8:
        raise argparse.ArgumentTypeError(f"expected a tile size >= 8 pixels or 'auto', got {value!r}")
    return number


def memory_arg(value) -> str:
    """A memory size such as ``8GiB``, ``8GB``, ``512MiB`` or a number of bytes (argparse type)."""
    from .pipelines.tiling import parse_memory

    try:
        parse_memory(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return str(value).strip()


def _precision_arg(value) -> str:
    """``float32``, ``bfloat16``, ``float16`` or ``auto`` (also accelerate's ``no``, ``fp32``, ``bf16``, ``fp16``;
    argparse type)."""
    from .pipelines.tiling import PRECISION_ALIASES, PRECISIONS

    name = PRECISION_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in (*PRECISIONS, "auto"):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PRECISIONS)}, auto (or {', '.join(PRECISION_ALIASES)}), "
                                         f"got {value!r}")
    return name


def _resolved_precision(precision, pipeline):
    """``precision`` with ``"auto"`` replaced by what the pipeline's device runs natively (bfloat16 or float32)."""
    if precision != "auto":
        return precision
    from .pipelines.tiling import auto_precision

    return auto_precision(getattr(pipeline, "_execution_device", None) or pipeline.device)


def non_negative_float(value) -> float:
    """A finite number ≥ 0 (argparse type)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return number


# ---------------------------------------------------------------------------- records
SAME_AS_DEFAULT = "same as default"  # Option.eval_default when the evaluation shares the command line's default


@dataclass(frozen=True)
class Option:
    """A call argument of a method and its command-line flags.

    Args:
        name: the keyword the run function receives (and the key in records and configs).
        type: parses the command-line string (an argparse ``type``).
        default: the value when the flag is not given (``None``: the pipeline's own default).
        help: one line for ``--help``.
        flag: the ``diffusers-blind deblur`` flag (default ``--name-with-dashes``).
        eval_flag: the evaluation flag (default ``--name_with_underscores``).
        eval_default: the evaluation's default if it differs from ``default`` (may be ``None``).
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    flag: str | None = None
    eval_flag: str | None = None
    eval_default: Any = SAME_AS_DEFAULT

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def evaluation_flag(self) -> str:
        return self.eval_flag or "--" + self.name

    @property
    def evaluation_default(self):
        return self.default if self.eval_default is SAME_AS_DEFAULT else self.eval_default


@dataclass
class MethodResult:
    """What a method returns: the restored ``(1, C, H, W)`` image in ``[0, 1]``, the ``(1, 1, k, k)``
    kernel or ``None``, the noise std it used in 8-bit levels (``None`` if it uses none), a
    per-pixel std ``(1, 1, H, W)`` or ``None``, and for turbulence the estimated tilt field
    ``(1, 2, H, W)`` in pixels (channel 0 horizontal, 1 vertical) or ``None``; for a method with a guard,
    ``fallback`` (the guard returned the input instead of a failed estimate) and the re-blur ``fit``."""

    image: torch.Tensor
    kernel: torch.Tensor | None = None
    sigma: float | None = None
    uncertainty: torch.Tensor | None = None
    tilt: torch.Tensor | None = None
    fallback: bool | None = None
    fit: float | None = None


@dataclass
class Method:
    """One deblurring method of the registry.

    Args:
        name: what ``--method`` / ``--methods`` take.
        run: ``run(y, *, sigma, kernel, generator, pipeline, blur, **options) -> MethodResult``.
        description: one line for ``--help``.
        pipeline_class: loaded with ``pipeline_class.from_pretrained(folder)`` and passed as ``pipeline``.
        default_model: the folder used when no ``--model`` is given.
        needs_kernel: the method is non-blind and must be given the true kernel.
        accepts_kernel: a blind method that can also run with a known kernel (``deblur --kernel``).
        returns_kernel: the result holds a kernel estimate (kernel metrics are computed for blind ones).
        options: the method's call arguments.
        info: fixed facts recorded with every result (e.g. ``{"guidance": "dps"}``).
        check: ``check(pipeline, options, kernel_given) -> list of notes``, called once before the run;
            raises ``ValueError`` for settings that cannot work.
        uses_sigma: the method reads the noise level ``sigma`` (``deblur --sigma`` given to one that does not
            is announced as unused).
        check_options: ``check_options(options)``, called with the option values when the arguments are
            checked (before any model is loaded or file touched); raises ``ValueError`` for values that
            cannot go together.
    """

    name: str
    run: Callable[..., MethodResult]
    description: str = ""
    pipeline_class: type | None = None
    default_model: str | None = None
    needs_kernel: bool = False
    accepts_kernel: bool = False
    returns_kernel: bool = True
    options: tuple[Option, ...] = ()
    info: dict = field(default_factory=dict)
    check: Callable[..., list[str]] | None = None
    uses_sigma: bool = True
    check_options: Callable[[dict], None] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to redefine a name). Options shared by several
    methods (same name) must agree on flags, type and default."""
    if not replace and method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered (pass replace=True)")
    if method.needs_kernel and method.accepts_kernel:
        raise ValueError(f"{method.name}: needs_kernel and accepts_kernel exclude each other")
    known = {o.name: o for m in METHODS.values() if m.name != method.name for o in m.options}
    for option in method.options:
        other = known.get(option.name)
        if other is not None and (other.cli_flag, other.evaluation_flag, other.default, other.evaluation_default) != (
            option.cli_flag, option.evaluation_flag, option.default, option.evaluation_default
        ):
            raise ValueError(f"{method.name}: option {option.name!r} differs from the one other methods declare")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None


def default_steps(method: Method) -> int | None:
    """The ``num_inference_steps`` default of ``method``'s pipeline ``__call__``: what an unset ``steps`` runs."""
    if method.pipeline_class is None:
        return None
    parameter = inspect.signature(method.pipeline_class.__call__).parameters.get("num_inference_steps")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def with_default_steps(method: Method, options: dict) -> dict:
    """``options`` with an unset ``steps`` replaced by the method's own default (:func:`default_steps`), so that
    every record names the step count that ran."""
    if "steps" in options and options["steps"] is None:
        return {**options, "steps": default_steps(method)}
    return options


def all_options(methods=None) -> dict[str, Option]:
    """Every option of ``methods`` (default: all registered) by name, in registration order."""
    methods = METHODS.values() if methods is None else methods
    return {option.name: option for method in methods for option in method.options}


def load_pipeline(method: Method, folder: str | None, device):
    """The pipeline ``method`` needs, from ``folder`` (default: its own), on ``device``; ``None`` if it needs none."""
    if method.pipeline_class is None:
        return None
    return method.pipeline_class.from_pretrained(str(folder or method.default_model)).to(device)


# ---------------------------------------------------------------------------- built-in methods
PRECISION_OPTION = Option(
    "precision", _precision_arg, "auto",
    "the networks' arithmetic: float32, bfloat16 (bf16) or float16 (fp16) autocast, or auto (default): bfloat16 "
    "where the device computes it natively (a CPU with AVX512-BF16/AMX, a GPU with bf16), else float32; the "
    "evaluation defaults to float32. Fast EM: the UNet only, guidance and kernel steps stay float32 (bfloat16 about "
    "18% faster, same quality); dvsr: predictor and denoiser, the chain stays float32 (bfloat16 about 2x faster); "
    "blind-dps: the image, kernel (and tilt) UNets, the chains stay float32",
    eval_default=None)


def _margin(blur: str | None):
    """Pipeline ``boundary_margin`` for the data: none for circular blur, the default reflect margin otherwise."""
    return 0 if blur == "circular" else None


def _steps_kwarg(steps) -> dict:
    """``num_inference_steps`` for a pipeline call; nothing when unset, so the pipeline's own default applies."""
    return {} if steps is None else {"num_inference_steps": steps}


def default_kernel_size(pipeline, y: torch.Tensor):
    """The blind Fast EM methods' kernel size when none is given: ``"auto"`` where the image has room for
    two supports of the model's size ``P`` (the automatic choice then never goes below ``P``; it only
    grows the support when a sparse-prior probe sees a longer blur), else ``None`` (the model's size).

    On synthetic camera shake the probe keeps ``P`` (33 for the shipped model) on every benchmark input,
    up to 47 px kernels; on a real horizontal streak (scikit-image's ``clock_motion``) it picks 45 and the
    ghost arcs a 33 px support leaves go away (docs/kernel_estimation.md).
    """
    from .pipelines.fast_em.pipeline_fast_em_deblur import KERNEL_SIZE_CANDIDATES

    size = pipeline.kernel_estimator.config.kernel_size
    return "auto" if size in KERNEL_SIZE_CANDIDATES and min(y.shape[-2:]) >= 2 * size else None


def _fastem_run(guidance: str, diffusion_em: bool = False):
    def run(y, *, sigma, kernel, generator, pipeline, blur, steps, particles, guidance_scale, kernel_size=None,
            em_iterations=None, guard=True, tile_size=None, max_memory=None, precision=None, kernel_init=None,
            m_step_start=None, kernel_anchor=None, strength=None, num_scales=None):
        options = _steps_kwarg(steps) if strength is None else {**_steps_kwarg(steps), "strength": strength}
        if kernel is None and num_scales is not None and not diffusion_em:
            options["num_scales"] = num_scales
        if kernel is None and kernel_init is not None:
            options["kernel_init"] = kernel_init
        if kernel is None and m_step_start is not None:
            options["m_step_start"] = m_step_start
        if kernel is None and kernel_anchor is not None:
            options["kernel_anchor"] = kernel_anchor
        if kernel is None and kernel_size is None and not diffusion_em:
            kernel_size = default_kernel_size(pipeline, y)
        out = pipeline(
            y,
            sigma=sigma,
            kernel=kernel,
            guidance=guidance,
            guidance_scale=guidance_scale,
            kernel_size=kernel_size if kernel is None else None,
            num_particles=particles,
            em_iterations=em_iterations if diffusion_em else None,
            boundary_margin=_margin(blur),
            guard=True if guard is None else guard,
            tile_size=tile_size,
            max_memory=max_memory,
            precision=_resolved_precision(precision, pipeline),
            generator=generator,
            output_type="pt",
            **options,
        )
        return MethodResult(out.images.float().cpu(), out.kernels.float().cpu(), float(out.sigma[0]),
                            out.uncertainty, fallback=bool(out.fallback[0]) if out.fallback else None,
                            fit=float(out.fit[0]) if out.fit else None)

    return run


PAPER_DPS_STEPS = 1000


def _fastem_check(pipeline, options, kernel_given) -> list[str]:
    if not kernel_given and getattr(pipeline, "kernel_estimator", None) is None:
        raise ValueError("the model has no kernel_estimator, so it can only deblur with a known kernel "
                         "(pass --kernel FILE, or use a known-kernel method)")
    tile_size = options.get("tile_size")
    unet = getattr(pipeline, "unet", None)
    if tile_size is not None and unet is not None:
        multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        if tile_size < multiple:
            raise ValueError(f"--tile-size must be at least {multiple} for this model (its UNet's size multiple)")
    return []


def _diffusion_em_options_check(options) -> None:
    _kernel_init_check("diffusion-em", FASTEM_KERNEL_INITS)(options)
    if options.get("kernel_size") == "auto":
        raise ValueError("--kernel-size auto is for the Fast EM methods; give diffusion-em a size (e.g. 33)")


def _dps_check(pipeline, options, kernel_given) -> list[str]:
    notes = _fastem_check(pipeline, options, kernel_given)
    steps = options.get("steps")
    if steps is not None and steps < PAPER_DPS_STEPS:
        notes.append(f"the paper runs DPS guidance with {PAPER_DPS_STEPS} steps; running {steps} as asked "
                     f"(pass --steps {PAPER_DPS_STEPS} for the paper's setting)")
    return notes


def _noise_sigma_01(y: torch.Tensor, sigma) -> float:
    """``sigma`` (8-bit levels or ``"auto"``) in ``[0, 1]`` units."""
    if sigma == "auto":
        from .ops.noise import AUTO_SIGMA_FLOOR, estimate_noise_sigma

        return float(estimate_noise_sigma(y, floor=AUTO_SIGMA_FLOOR)[0])
    return float(sigma) / 255.0


def _wiener_run(y, *, sigma, kernel, generator, pipeline, blur):
    from .baselines import wiener_deconvolution

    sigma_01 = _noise_sigma_01(y, sigma)
    image = wiener_deconvolution(y, kernel.to(y.device), sigma_01, blur or "valid")
    return MethodResult(image.cpu(), kernel.cpu(), sigma_01 * 255)


def _identity_run(y, *, sigma, kernel, generator, pipeline, blur, kernel_size):
    """The measurement itself, with a Dirac kernel of ``kernel_size`` (at most the image's smaller side)."""
    from .ops import dirac_kernel

    size = min(kernel_size if isinstance(kernel_size, int) else 1, min(y.shape[-2:]))
    return MethodResult(y.clamp(0, 1).cpu(), dirac_kernel(size))


def _register_builtins() -> None:
    from . import DEFAULT_MODEL
    from .pipelines import FastEMDeblurPipeline

    steps = Option("steps", positive_int, None,
                   "diffusion steps (default: the method's: 50 for Fast EM, 250 for BlindDPS)")
    particles = Option("particles", positive_int, 1,
                       "posterior samples averaged per image; > 1 also writes an uncertainty map (default 1)")
    guidance_scale = Option("guidance_scale", non_negative_float, None,
                            "multiplier of the paper's guidance step size; with DiffPIR the weight of its data step "
                            "(default: the pipeline's; shipped: 4.5 for Fast EM with Pi-GDM, 1.25 with DPS, 0.5 with "
                            "DiffPIR, 5 for BlindDPS at 250 steps)")
    kernel_size = Option("kernel_size", kernel_size_or_auto, None,
                         "size of the estimated kernel, or 'auto' to pick it from the extent of a sparse-prior kernel "
                         "estimate (default: auto for fastem-pigdm/-dps/-diffpir on images of at least twice the model's size, "
                         "never below the model's 33 then; the model's size otherwise and for diffusion-em)")
    em_iterations = Option("em_iterations", positive_int, 3, "full runs of --method diffusion-em (default 3 in deblur, 10 in the evaluation)",
                           eval_default=10)
    tiling = (
        Option("tile_size", tile_size_arg, None,
               "run the UNet on overlapping tiles of this many pixels (bounded memory for any image size), or "
               "'auto' (default: from --max-memory; an image runs whole while that is cheaper than 384 px tiles, "
               "e.g. up to 512 px a side with the 33 px kernel's margin)"),
        Option("max_memory", memory_arg, None,
               "memory budget for the automatic tile size, e.g. 8GiB (default: 60% of the free RAM, or of the "
               "free GPU memory)"),
        PRECISION_OPTION,
    )
    guard = Option("guard", on_off, True,
                   "on (default): a blind estimate that explains the photo worse than the photo itself, or "
                   "that collapsed into saturated stripes, is replaced by the input, with a warning; off: keep it")
    kernel_init = Option("kernel_init", kernel_init_arg, None,
                         "how a blind run starts its kernel: sparse (default: a coarse-to-fine estimate under an L0 "
                         "gradient prior), dirac (Fast EM's paper) or noise (blind-dps: BlindDPS's paper)")
    m_step_start = Option("m_step_start", _unit_interval, None,
                          "fraction of the steps that keep the starting kernel before the M-step runs (default 0.8; "
                          "0 = every step, the paper; 1 = never)")
    kernel_anchor = Option("kernel_anchor", non_negative_float, None,
                           "weight of the M-step's pull toward the starting kernel (a sparse, coarse or given "
                           "start; not a Dirac); 0 = a free M-step, the paper (default: the pipeline's)")
    strength = Option("strength", _strength_arg, None,
                      "fraction of the steps to run, starting from the photo noised to that level (img2img; "
                      "0.5 halves the time for about 0.2 dB; default 1: from pure noise)")
    num_scales = Option("num_scales", _num_scales_arg, None,
                        "coarse-to-fine levels of the blind run (default 1; 2: the whole method on the half-size "
                        "photo first, then the last 30% of the steps at full size: about 0.55x the time, quality "
                        "mixed, see docs/scale.md)")
    pipeline_options = (steps, particles, guidance_scale, kernel_size, guard, kernel_init, m_step_start, kernel_anchor,
                        strength, num_scales, *tiling)
    common = dict(pipeline_class=FastEMDeblurPipeline, default_model=DEFAULT_MODEL)
    for name, guidance, description in (
        ("fastem-pigdm", "pigdm", "Fast Diffusion EM with Pi-GDM guidance (blind; with --kernel: non-blind)"),
        ("fastem-dps", "dps", "Fast Diffusion EM with DPS guidance (blind; the paper uses 1000 steps)"),
        ("fastem-diffpir", "diffpir", "Fast Diffusion EM with DiffPIR's data step as the E-step (blind; UNet "
                                      "forward passes only: 2.6x faster per 128px crop, 1.5x on the README's example)"),
    ):
        register_method(Method(name, _fastem_run(guidance), description, accepts_kernel=True,
                               options=pipeline_options, info={"guidance": guidance},
                               check=_dps_check if guidance == "dps" else _fastem_check,
                               check_options=_kernel_init_check(name, FASTEM_KERNEL_INITS), **common))
    register_method(Method("diffusion-em", _fastem_run("pigdm", diffusion_em=True),
                           "Diffusion EM: several full Pi-GDM runs, one kernel update after each (slower)",
                           options=(*(o for o in pipeline_options if o not in (m_step_start, strength, num_scales)),
                                    em_iterations),
                           info={"guidance": "pigdm"},
                           check=_fastem_check, check_options=_diffusion_em_options_check, **common))
    for name, guidance in (("pigdm-known-kernel", "pigdm"), ("dps-known-kernel", "dps"),
                           ("diffpir-known-kernel", "diffpir")):
        register_method(Method(name, _fastem_run(guidance), f"non-blind {guidance} guidance with the true kernel",
                               needs_kernel=True, options=(steps, particles, guidance_scale, strength, *tiling),
                               info={"guidance": guidance}, check=_fastem_check, **common))
    register_method(Method("wiener-known-kernel", _wiener_run,
                           "non-blind Wiener deconvolution with the true kernel (gradient prior, no model)",
                           needs_kernel=True))
    register_method(Method("identity", _identity_run, "no restoration: the blurry input, with a Dirac kernel",
                           options=(kernel_size,), uses_sigma=False))


def _unit_interval(value) -> float:
    number = non_negative_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def _open_unit_interval(value) -> float:
    number = _unit_interval(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return number


def _num_scales_arg(value) -> int:
    number = positive_int(value)
    if number > 8:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 8], got {value!r}")
    return number


def _strength_arg(value) -> float:
    try:
        number = _unit_interval(value)
    except argparse.ArgumentTypeError:
        number = 0.0
    if number == 0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return number


def _register_dvsr() -> None:
    """DvSR (deblurring via stochastic refinement), when its pipeline is part of the package. It estimates
    no kernel (a pipeline saved with a ``kernel_estimator`` reports one); the package ships a default model."""
    try:
        from . import DVSR_DEFAULT_MODEL
        from .pipelines.dvsr import StochasticRefinementDeblurPipeline
    except ImportError:
        return

    def check_options(options) -> None:
        # the knob and the explicit (steps, samples) pair are exclusive: send one or the other
        explicit = options.get("dvsr_steps") is not None or options.get("dvsr_samples") is not None
        if explicit and options.get("perception_distortion") is not None:
            raise ValueError("give either --perception-distortion or --dvsr-steps/--dvsr-samples, not both")

    def run(y, *, sigma, kernel, generator, pipeline, blur, perception_distortion, dvsr_steps, dvsr_samples,
            precision=None):
        check_options({"perception_distortion": perception_distortion, "dvsr_steps": dvsr_steps,
                       "dvsr_samples": dvsr_samples})
        if dvsr_steps is not None or dvsr_samples is not None:
            settings = {"num_inference_steps": dvsr_steps or 10, "num_samples": dvsr_samples or 1}
        else:
            settings = {"perception_distortion": perception_distortion}
        out = pipeline(y, sigma=sigma, generator=generator, output_type="pt", boundary_margin=0,
                       mixed_precision=_resolved_precision(precision, pipeline), **settings)
        kernels = None if out.kernels is None else out.kernels.float().cpu()
        return MethodResult(out.images.float().cpu(), kernels, out.sigma[0] if out.sigma else None, out.uncertainty)

    register_method(Method(
        "dvsr", run, "deblurring via stochastic refinement (predictor + conditional diffusion on the residual; no kernel)",
        pipeline_class=StochasticRefinementDeblurPipeline, default_model=DVSR_DEFAULT_MODEL, returns_kernel=False,
        check_options=check_options,
        options=(
            Option("perception_distortion", _unit_interval, None,
                   "DvSR knob in [0, 1]: 0 = sharpest (100 steps, 1 sample), 1 = lowest distortion "
                   "(1 step, 16 samples averaged; the pipeline's default); 0.5 = the paper's SA (10 steps × 4)"),
            Option("dvsr_steps", positive_int, None, "DvSR diffusion steps (instead of the knob)"),
            Option("dvsr_samples", positive_int, None, "DvSR samples averaged (instead of the knob)"),
            PRECISION_OPTION,
        ),
    ))


def _register_blind_dps() -> None:
    """BlindDPS (joint image and kernel diffusion), when its pipeline is part of the package, with its shipped default."""
    try:
        from . import BLIND_DPS_DEFAULT_MODEL
        from .pipelines.blind_dps import BlindDPSPipeline
    except ImportError:
        return

    def check_size(name, y, pipeline) -> None:
        # the kernel size is the prior's own (no option sets it): say what a user can change, the image
        size = int(pipeline.kernel_unet.config.sample_size)
        if min(y.shape[-2:]) < size:
            raise ValueError(f"the image is {y.shape[-1]}x{y.shape[-2]} px, but {name} needs at least {size} px a side "
                             f"(its kernel prior's size, {size}x{size}); use a larger image or a Fast EM method")

    def run(y, *, sigma, kernel, generator, pipeline, blur, steps, particles, guidance_scale, kernel_init=None,
            kernel_strength=None, precision=None):
        check_size("blind-dps", y, pipeline)
        # circular data: the periodic model, no margin; a photograph: a mirrored margin of half the kernel,
        # which makes the result independent of the boundary model (the data term sees the image only)
        margin = 0 if blur == "circular" else pipeline.kernel_unet.config.sample_size // 2
        out = pipeline(y, **_steps_kwarg(steps), blur_model="circular" if blur == "circular" else "reflect",
                       guidance_scale=guidance_scale, num_particles=particles, boundary_margin=margin,
                       generator=generator, output_type="pt", kernel_init=kernel_init,
                       kernel_strength=kernel_strength, sigma="auto" if sigma is None else sigma,
                       precision=_resolved_precision(precision, pipeline))
        used_sigma = float(out.sigma[0]) if out.sigma else None  # the level the sparse start read
        return MethodResult(out.images.float().cpu(), out.kernels.float().cpu(), used_sigma, out.uncertainty)

    def check(pipeline, options, kernel_given) -> list[str]:
        steps = options.get("steps")
        if steps is not None and steps < PAPER_DPS_STEPS:
            return [f"BlindDPS runs {PAPER_DPS_STEPS} steps in the paper; running {steps} (--steps {PAPER_DPS_STEPS} "
                    "for the paper's setting)"]
        return []

    shared = all_options([METHODS["fastem-pigdm"]])
    options = (shared["steps"], shared["particles"], shared["guidance_scale"])
    kernel_strength = Option("kernel_strength", _open_unit_interval, None,
                             "blind-dps: fraction of the steps the kernel chain runs after a sparse start kernel, "
                             "which it keeps before (default: the model's, 0.5 for the shipped one)")
    register_method(Method(
        "blind-dps", run, "BlindDPS: image and kernel diffusion priors, joint DPS guidance (blind; the shipped "
        "model starts the kernel from the sparse estimate, --kernel-init noise is the paper)",
        pipeline_class=BlindDPSPipeline, default_model=BLIND_DPS_DEFAULT_MODEL,
        options=(*options, shared["kernel_init"], kernel_strength, PRECISION_OPTION), info={"guidance": "dps"},
        check=check,
        check_options=_kernel_init_check("blind-dps", BLIND_DPS_KERNEL_INITS),
    ))

    def run_turbulence(y, *, sigma, kernel, generator, pipeline, blur, steps, particles, guidance_scale,
                       precision=None):
        check_size("blind-dps-turbulence", y, pipeline)
        # the same boundary handling as blind-dps; the tilt chain covers the whole padded canvas
        margin = 0 if blur == "circular" else pipeline.kernel_unet.config.sample_size // 2
        out = pipeline(y, **_steps_kwarg(steps), blur_model="circular" if blur == "circular" else "reflect",
                       guidance_scale=guidance_scale, num_particles=particles, boundary_margin=margin,
                       generator=generator, output_type="pt", precision=_resolved_precision(precision, pipeline))
        return MethodResult(out.images.float().cpu(), out.kernels.float().cpu(), None, out.uncertainty,
                            tilt=out.tilts.float().cpu())

    from .pipelines.blind_dps import BlindDPSTurbulencePipeline

    register_method(Method(
        "blind-dps-turbulence", run_turbulence,
        "BlindDPS through turbulence: image, kernel and tilt-field priors (y = k * T_d(x) + n; writes the tilt field)",
        pipeline_class=BlindDPSTurbulencePipeline, default_model=BLIND_DPS_DEFAULT_MODEL,
        options=(*options, PRECISION_OPTION),
        info={"guidance": "dps", "degradation": "tilt then blur"}, check=check, uses_sigma=False,
    ))


_register_builtins()
_register_dvsr()
_register_blind_dps()
