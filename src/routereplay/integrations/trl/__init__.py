"""Router replay (R2, R3) in TRL's GRPOTrainer: `routereplay[trl]`.

    from routereplay.integrations.trl import GRPOTrainer

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                          train_dataset=dataset, router_replay="R3")

`trainer` (the `GRPOTrainer` subclass and `RouterReplayMixin` for other subclasses),
`client` (TRL's vLLM client keeping each choice's routes), `batch` (routes laid out
and carried as TRL's batch), `passes` (what each of TRL's passes records or replays),
`forwards` and `generation` (micro-batch keys and rollouts for forwards TRL loops over).
Importing this package imports trl; nothing else in routereplay does.
"""

from routereplay.integrations.trl.client import RoutedVLLMClient
from routereplay.integrations.trl.passes import MODES, ReplayMode
from routereplay.integrations.trl.trainer import GRPOTrainer, RouterReplayMixin

__all__ = ["MODES", "GRPOTrainer", "ReplayMode", "RoutedVLLMClient", "RouterReplayMixin"]
