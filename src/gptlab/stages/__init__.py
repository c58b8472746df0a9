"""Training stages: one file per objective, each a ``Stage`` on the shared trainer and a ``run_*`` function.

    pretrain.py   next-token loss on token shards (GPT-2/3)
    finetune.py   GPT-1: input transformations, a task head, L3 = L2 + λ·L1
    sft.py        InstructGPT step 1: response-only loss through the chat format
    reward.py     step 2: a reward model from rankings of K responses
    ppo.py        step 3: PPO with a per-token KL penalty and the pretraining mix (the rollout is ``prepare``)
    dpo.py        DPO on the same rankings, without a reward model
    common.py     what they share: ``StageRun`` (run set-up and config resolution), batches, sequences

A ``run_*`` takes its inputs, a ``train`` config (a ``TrainConfig`` or the fields
to set), its own settings (e.g. ``DPOConfig`` or ``{"beta": 0.5}``) and
``resume``; a resumed run restores its saved settings itself.
"""
