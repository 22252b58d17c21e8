"""The learnable temperature (`config.temperature_learnable`): CLIP's logit scale.

With it, the train state's params hold one entry beside the model's: `logit_scale` =
log(1 / tau), a float32 scalar initialised from `config.temperature`. It trains,
checkpoints and shards (replicated: it is small) with the parameters, is clamped after
every update as CLIP clamps it, and stays out of the model directory (an encoder's
embeddings do not depend on it). Without it the params (and checkpoints) are the
model's alone.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

Config = Any  # anything with config.defaults()' keys as attributes

LOGIT_SCALE = "logit_scale"
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit scale) to at most 100


def logit_scale_bounds(temperature: float) -> tuple[float, float]:
  """[least, largest] of the logit scale: CLIP's [log 1, log 100], the top raised to
  log(1/temperature) when that is larger (the paper's tau 0.005 is a scale of 200),
  so the initial value is never cut."""
  return 0.0, math.log(max(CLIP_MAX_LOGIT_SCALE, 1.0 / temperature))


def with_logit_scale(params: Any, config: Config) -> Any:
  """The params the train state holds: the model's, plus log(1 / temperature) when the
  temperature is learnable."""
  if not config.temperature_learnable:
    return params
  return {**params, LOGIT_SCALE: np.float32(math.log(1.0 / config.temperature))}


def split_logit_scale(params: Any) -> tuple[Any, Any]:
  """(the model's params, the logit scale or None) of the train state's params."""
  if LOGIT_SCALE not in params:
    return params, None
  return {k: v for k, v in params.items() if k != LOGIT_SCALE}, params[LOGIT_SCALE]


def clamp_logit_scale(temperature: float) -> optax.GradientTransformation:
  """The last transform of the chain: the update that leaves the logit scale inside
  `logit_scale_bounds` (CLIP clamps the parameter after each step)."""
  low, high = logit_scale_bounds(temperature)

  def update(updates, state, params=None):
    if params is None or LOGIT_SCALE not in updates:
      return updates, state
    scale = params[LOGIT_SCALE]
    return {**updates, LOGIT_SCALE: jnp.clip(scale + updates[LOGIT_SCALE], low, high)
            - scale}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
