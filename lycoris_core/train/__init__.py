"""Training LyCORIS adapters on any torch module tree: targets, attachment, optimisation loop.

    targets = select_targets(Root(unet), "attn-mlp")
    built = create_adapters(targets, "lokr", rank=8, alpha=4, factor=8)
    trainer = Trainer(built.adapters, steps=100, lr=1e-4)
    with attached(built.pairs(), regularizer=Dropout(rank_dropout=0.1)):
        for batch in data:
            trainer.step(lambda: loss_of(batch))
    freeze(built.adapters); save_file(built.adapters, "out.safetensors", metadata)
"""
from .attach import (activations_copied, attached, autograd_safe, checkpoint_blocks, checkpointed, frozen,
                     wrapper_weights_kept)
from .buckets import BucketSampler, Placement, aspect_error, bucket_sizes, nearest_bucket, place
from .build import (Built, create_adapters, default_kinds, freeze, layer_kinds, resume_adapters, trainable_algorithms,
                    trainable_copy)
from .dylora import DyLoRA, as_dylora, truncated
from .loop import OPTIMIZERS, SCHEDULES, Dropout, OptimizerSpec, Trainer, lr_factor, make_optimizer, param_groups
from .objective import (TIMESTEP_SAMPLING, flux_resolution_shift, min_snr_weight, offset_noise, sample_t,
                        shift_t)
from .targets import PRESETS, Preset, Root, Target, kohya_name, select_targets

__all__ = ["BucketSampler", "Built", "Placement", "aspect_error", "bucket_sizes", "nearest_bucket", "place",
           "Dropout", "OPTIMIZERS", "OptimizerSpec", "PRESETS", "Preset", "Root", "SCHEDULES",
           "TIMESTEP_SAMPLING", "Target", "flux_resolution_shift", "min_snr_weight", "offset_noise",
           "sample_t", "shift_t",
           "Trainer", "activations_copied", "attached", "autograd_safe", "checkpoint_blocks", "checkpointed", "wrapper_weights_kept",
           "create_adapters", "default_kinds", "freeze", "frozen", "kohya_name", "layer_kinds", "lr_factor", "make_optimizer",
           "param_groups", "resume_adapters", "select_targets", "trainable_algorithms",
           "DyLoRA", "as_dylora", "truncated",
           "trainable_copy"]
