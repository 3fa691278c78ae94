"""Straight-through discretizers: hard discrete actions forward, a soft surrogate's gradient backward.

A policy that outputs a logit ``z`` for "push right" can act on CartPole with the hard action
``a = 1[z > 0]`` while training by backpropagation: the forward pass returns exactly 0.0 or 1.0 and
the backward pass uses the gradient of the soft surrogate ``sigmoid(z / temperature)``. This is the
straight-through estimator (Bengio, Léonard & Courville 2013).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    # Forward: hard (soft - soft cancels exactly in floating point). Backward: d soft.
    return soft + jax.lax.stop_gradient(hard - soft)


def straight_through_bernoulli(logit: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Hard ``1[logit > 0]`` forward; gradient of ``sigmoid(logit / temperature)`` backward.

    Args:
        logit: any shape; the logit of action 1 ("push right" in CartPole).
        temperature: the surrogate's temperature (> 0); smaller is closer to the hard step and
            gives larger, more local gradients.

    Returns:
        float array of ``logit``'s shape holding exactly 0.0 or 1.0.
    """
    soft = jax.nn.sigmoid(logit / temperature)
    hard = (logit > 0).astype(soft.dtype)
    return _straight_through(hard, soft)


def straight_through_threshold(probability: jax.Array) -> jax.Array:
    """Hard ``1[p > 0.5]`` forward; identity gradient backward (surrogate ``a = p``).

    Args:
        probability: any shape, values in [0, 1]: the probability of action 1.
    """
    probability = jnp.asarray(probability)
    hard = (probability > 0.5).astype(probability.dtype)
    return _straight_through(hard, probability)


def straight_through_argmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """One-hot ``argmax(logits)`` forward; gradient of ``softmax(logits / temperature)`` backward.

    Args:
        logits: shape ``(..., n)``.

    Returns:
        one-hot float array of ``logits``'s shape. For a 2-action env, ``onehot[..., 1]`` is the
        CartPole action in [0, 1].
    """
    soft = jax.nn.softmax(logits / temperature, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return _straight_through(hard, soft)
