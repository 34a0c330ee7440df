"""What a torch worker needs to run on the GPU memory service (used by the reference worker, demo/llm_worker.py --gms).

    region, model = gms.worker.model_from_service(Qwen3ForCausalLM, cfg, "/run/dynsnap/gms.sock", "qwen3-0.6b", 0)
    kv = gms.worker.kv_pool(16 << 30, 0)          # a PrivateRegion; kv.tensor() is the uint8 pool
    gms.worker.start_agent()                      # quiesce releases both, resume maps them back

The model is built on the meta device (no memory, no random init) and its parameters are then *assigned* the
region's tensor views (``load_state_dict(assign=True)``): zero copies, the weights live in the service's
allocation, mapped read-only. Tied weights (``tie_word_embeddings``) are tied after the assignment;
non-persistent buffers (rotary frequencies) are computed on the device by the caller.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from . import agent, regions

__all__ = ["ensure_set", "model_from_service", "kv_pool", "start_agent"]


def ensure_set(safetensors: str, name: str, store: Optional[str] = None) -> str:
    """Weight set ``name`` in ``store``, imported from a safetensors file once (no-op when it exists)."""
    from ..weights import Store, WeightSetNotFound
    st = Store(store)
    try:
        st.open(name)
    except WeightSetNotFound:
        st.import_safetensors([os.fspath(safetensors)], name)
    return name


def model_from_service(model_cls: Any, cfg: Any, socket_path: str, set_ref: str, device: int = 0,
                       layout_hash: Optional[str] = None) -> tuple[regions.WeightsRegion, Any]:
    """(the weights region, the model whose parameters are views of it)."""
    import torch
    region = regions.map_weights(socket_path, set_ref, layout_hash, device=device)
    tensors = region.tensors()
    with torch.device("meta"):
        m = model_cls(cfg)
    missing, unexpected = m.load_state_dict(tensors, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        m.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise regions.RegionError(f"weight set {set_ref!r} does not fit the model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}", code="mismatch")
    return region, m


def kv_pool(nbytes: int, device: int = 0, *, keep: bool = False) -> regions.PrivateRegion:
    return regions.PrivateRegion(int(nbytes), device, keep=keep)


def start_agent() -> str:
    """Start this process's agent with a torch callback: synchronize and empty torch's cache on quiesce, so that
    no freed activation memory travels in the snapshot."""
    import torch

    def _quiesce() -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    agent.register(quiesce=_quiesce)
    return agent.start()
