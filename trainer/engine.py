"""The DeepSpeed engine over the composed model: config, optimizer, warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch

from model_zoo.goembedfusion import GOEmbedFusion
from trainer.config import ConfigError, RunConfig

# ZeRO bucket sizes (elements) are rounded up to a multiple of this: every alignment DeepSpeed asks for divides it.
BUCKET_ALIGNMENT = 64


def deepspeed_config(config: RunConfig, num_parameters: int | None = None) -> dict:
    """DeepSpeed's JSON config, derived from the run config (the only place it is written)."""
    distributed = config.distributed
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": distributed.gradient_accumulation_steps,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": distributed.zero_stage},
        "steps_per_print": 10**9,  # our logger reports; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }
    if distributed.zero_stage >= 1 and num_parameters:
        # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32, allocated up front under
        # ZeRO-3, measured with bench/trainer.py); a bucket never needs to exceed the model.
        # DeepSpeed asserts the buckets are a multiple of its alignment (2 elements: NCCL's 4 bytes
        # in 16-bit), which an odd parameter count is not: round up to BUCKET_ALIGNMENT.
        bucket = int(min(5e8, max(1e6, num_parameters)))
        bucket = -(-bucket // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
        ds["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if distributed.zero_stage == 3:
            ds["zero_optimization"]["stage3_prefetch_bucket_size"] = bucket
    if distributed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif distributed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    return ds


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_zero3_joint_training(config: RunConfig, model: GOEmbedFusion) -> None:
    """ZeRO-3 with ψ trained through GOEmbed needs the closed form (model_zoo/goembed.py).

    The closed form reads ψ only through ψ(0) and its input Jacobian, computed inside ψ's own
    forward, where ZeRO-3's hooks gather ψ's partitioned weights; the loss then reaches ψ by
    first-order autograd. The autograd form (the MLP representation, a non-zero origin, a decoder
    that also reads the point, ``model.goembed_method=autograd``) differentiates a second time
    through the renderer during backward, outside those hooks, which DeepSpeed 0.19 cannot do
    ("size of tensor a (0) ..."): refused here, with the two ways out.
    """
    from model_zoo.goembed import closed_form_applies

    model_config = config.model
    if not (config.distributed.zero_stage == 3 and model_config.train_decoder_through_encoder
            and model_config.encoder == "goembed"):
        return
    if model_config.goembed_method != "autograd" and closed_form_applies(model.renderer):
        return
    raise ConfigError(
        f"distributed.zero_stage=3 with model.train_decoder_through_encoder=true needs GOEmbed's closed form, which "
        f"does not apply here (model.representation={model_config.representation}, "
        f"model.goembed_method={model_config.goembed_method}): set model.train_decoder_through_encoder=false "
        f"(ψ then learns from the rendering loss only) or use distributed.zero_stage=2")


def build_engine(config: RunConfig, device: torch.device):
    """(engine, model) with a torch AdamW (DeepSpeed's "Adam" type would JIT-compile FusedAdam on CPU)."""
    import deepspeed

    model = GOEmbedFusion(config.model, activation_checkpointing=config.distributed.activation_checkpointing).to(device)
    check_zero3_joint_training(config, model)
    optim = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim.lr_warmup_steps, config.train.max_steps, optim.lr_min_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, sum(p.numel() for p in model.parameters())))
    return engine, model
