"""Reference inference worker for `dynsnap bench e2e`: a Qwen3-architecture transformers model with random weights.

Engine-like on purpose: the weights come from a local safetensors file written once (random, seeded: no
downloads), a KV pool sized like an engine's is allocated up front, the model is warmed up with a greedy
generation, and requests arrive on a Unix socket, one JSON object per line, one JSON reply per line:

    {"op": "ping"}                                   -> {"ok": true, "pid": ..., "device": ...}
    {"op": "generate", "tokens": [..], "max_new": N} -> {"ok": true, "tokens": [..], "seconds": s}  (greedy)
    {"op": "quiesce"}                                -> {"ok": true, "released_bytes": n}  KV pool freed, caches emptied
    {"op": "resume"}                                 -> {"ok": true, "kv_bytes": n}        KV pool allocated again
    {"op": "memory"}                                 -> {"ok": true, "allocated": n, "reserved": n, "kv_bytes": n}

With ``--gms SOCKET`` the weights come from the GPU memory service (imported once into the weight store as
set ``--gms-set``, mapped read-only, the model's parameters are views of the mapping), the KV pool is a
``PrivateRegion``, and the in-worker agent (dynsnap_core.gms.agent) is started: quiesce releases both (the
physical memory is freed, the addresses kept), resume maps them back at the same addresses.

``quiesce``/``resume`` are the hooks a checkpoint calls around the freeze: what need not travel in the snapshot
(the KV pool, the allocator's cache) is released before, and put back after restore.

    python3 -m dynsnap_core.demo.llm_worker --model qwen3-0.6b --weights DIR --sock PATH --ready FILE [--kv-gb 16]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

__all__ = ["MODELS", "PROMPT", "config_for", "ensure_weights", "weights_path"]

# Qwen3 shapes (the published configurations); "tiny" keeps tests and the CPU machine fast.
MODELS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, tie_word_embeddings=True,
                 max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6),
}
# A fixed prompt of token ids (no tokenizer: the weights are random, the tokens are what is compared).
PROMPT = [151643 % 1024, 9707 % 1024, 11, 1879 % 1024, 315, 279, 1156 % 1024, 13]
SEED = 1234


def config_for(model: str) -> Any:
    from transformers import Qwen3Config
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    return Qwen3Config(**MODELS[model], torch_dtype="bfloat16")


def weights_path(model: str, directory: str) -> str:
    return os.path.join(directory, f"{model}-random-seed{SEED}.safetensors")


def ensure_weights(model: str, directory: str) -> str:
    """The model's random weights as a safetensors file in ``directory`` (written once, atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM
    path = weights_path(model, directory)
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(SEED)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        m = Qwen3ForCausalLM(config_for(model)).to(torch.bfloat16)
    sd = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
    if MODELS[model]["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return path


class Worker:
    def __init__(self, model: str, weights: str, device: str, kv_bytes: int, gms: Any = None) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import Qwen3ForCausalLM
        self.torch, self.device, self.kv_bytes = torch, torch.device(device), kv_bytes
        cfg = config_for(model)
        self.gms = gms
        if gms is not None:                         # (socket, set name, store): weights from the service
            from ..gms import worker as gw
            self.weights_region, m = gw.model_from_service(Qwen3ForCausalLM, cfg, gms[0], gw.ensure_set(
                weights, gms[1], gms[2]), self.device.index or 0)
        else:
            with torch.device("meta"):                  # no random init: the weights come from the file
                m = Qwen3ForCausalLM(cfg)
            m = m.to_empty(device=self.device)
            sd = load_file(weights, device=str(self.device))
            missing, _ = m.load_state_dict(sd, strict=False, assign=True)
            if cfg.tie_word_embeddings:
                m.tie_weights()
            if [k for k in missing if k != "lm_head.weight"]:
                raise RuntimeError(f"weights file {weights} lacks {missing[:3]}")
        # non-persistent buffers (the rotary frequencies) are not in the file: compute them on the device
        with torch.device(self.device):
            m.model.rotary_emb = type(m.model.rotary_emb)(cfg)
        self.model = m.eval()
        self.kv = None
        if gms is not None:
            from ..gms import worker as gw
            self.kv_region = gw.kv_pool(kv_bytes, self.device.index or 0) if kv_bytes else None
            self.kv = self.kv_region.tensor()[:kv_bytes] if self.kv_region is not None else None
            self.agent = gw.start_agent()
            return
        self.resume()

    def resume(self) -> int:
        if self.gms is not None:                    # regions come back at their addresses; self.kv stays valid
            from ..gms import agent
            agent.default().resume()
            return self.kv_bytes
        if self.kv is None and self.kv_bytes:
            self.kv = self.torch.zeros(self.kv_bytes, dtype=self.torch.uint8, device=self.device)
        return self.kv_bytes if self.kv is not None else 0

    def quiesce(self) -> int:
        if self.gms is not None:                    # weights and KV pool released, addresses kept
            from ..gms import agent
            agent.default().quiesce()
            return self.kv_bytes
        freed = 0
        if self.kv is not None:
            freed, self.kv = self.kv.numel(), None
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        return freed

    def generate(self, tokens: list[int], max_new: int) -> list[int]:
        torch = self.torch
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      min_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return [int(t) for t in out[0, len(tokens):].tolist()]

    def memory(self) -> dict:
        cuda = self.device.type == "cuda"
        t = self.torch.cuda
        return {"allocated": t.memory_allocated() if cuda else 0, "reserved": t.memory_reserved() if cuda else 0,
                "kv_bytes": self.kv.numel() if self.kv is not None else 0}


def _serve(w: Worker, sock_path: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    req = json.loads(line)
                    op = req.get("op")
                    if op == "ping":
                        rep = {"ok": True, "pid": os.getpid(), "device": str(w.device)}
                    elif op == "generate":
                        t0 = time.perf_counter()
                        toks = w.generate([int(x) for x in req["tokens"]], int(req.get("max_new", 16)))
                        rep = {"ok": True, "tokens": toks, "seconds": time.perf_counter() - t0}
                    elif op == "quiesce":
                        rep = {"ok": True, "released_bytes": w.quiesce()}
                    elif op == "resume":
                        rep = {"ok": True, "kv_bytes": w.resume()}
                    elif op == "memory":
                        rep = {"ok": True, **w.memory()}
                    else:
                        rep = {"ok": False, "error": f"unknown op {op!r}"}
                except Exception as e:  # noqa: BLE001 - a bad request is answered, never fatal
                    rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                f.write((json.dumps(rep) + "\n").encode())
                f.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODELS))
    ap.add_argument("--weights", required=True, help="directory of the random weights file (written once)")
    ap.add_argument("--sock", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--kv-gb", type=float, default=0.0, help="KV pool allocated up front, GB")
    ap.add_argument("--max-new", type=int, default=16, help="tokens of the warm-up generation")
    ap.add_argument("--gms", metavar="SOCKET", help="take the weights from this GPU memory service (see above)")
    ap.add_argument("--gms-set", help="with --gms: weight set name (default: the weights file's name)")
    ap.add_argument("--weights-store", help="with --gms: weight store to import the set into (the service's)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import torch  # noqa: F401 - timed as part of the start
    import transformers  # noqa: F401
    t_import = time.perf_counter() - t0
    path = ensure_weights(a.model, a.weights)
    gms = (a.gms, a.gms_set or os.path.basename(path).rsplit(".", 1)[0], a.weights_store) if a.gms else None
    w = Worker(a.model, path, a.device, int(a.kv_gb * 1e9), gms)
    t_load = time.perf_counter() - t0 - t_import
    first = w.generate(PROMPT, a.max_new)
    with open(a.ready + ".tmp", "w") as fh:
        json.dump({"pid": os.getpid(), "import_s": t_import, "load_s": t_load,
                   "warm_s": time.perf_counter() - t0 - t_import - t_load, "tokens": first,
                   "agent": getattr(w, "agent", None)}, fh)
    os.replace(a.ready + ".tmp", a.ready)
    _serve(w, a.sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
