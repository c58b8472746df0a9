"""Training stages: one file per objective (pretrain, finetune, sft, rm, dpo).

Each stage gives the shared trainer (``gptlab.trainer.Trainer``) its data and
its loss through the ``Stage`` protocol::

    class MyStage:
        name = "sft"
        def batch(self, step: int, micro_step: int) -> Any: ...       # pure in (step, micro_step)
        def loss(self, model, batch) -> tuple[Tensor, dict]: ...       # mean loss, metrics
        # optional: evaluate(model) -> dict, sample(model) -> str,
        #           num_tokens(batch) -> int, save(run_dir, model)

and a ``run_<stage>(...)`` function that builds the model, the stage and a
``Trainer`` (see ``stages.pretrain.run_pretrain``).
"""

from ..trainer import Stage

__all__ = ["Stage"]
