"""The process the GPU snapshot benchmark boots, suspends and resumes.

A Llama-shaped decoder written in plain torch (RMSNorm, rotary attention over a static KV
cache, SwiGLU MLP; random bf16 weights, about 1.1 GB at the default size), whose whole decode
step (embedding -> layers -> greedy argmax -> next input, position += 1) is captured as one CUDA
graph per batch size, optionally after ``torch.compile``. Weights are streamed from a casfs
image with ``snapshot.weights.load_into_module``, as a real replica would load them.

Modes:
  --prepare STORE   write random weights as safetensors into a casfs image (tag snapworker) and exit
  (default)         boot, print one JSON "ready" line with phase timings and reference tokens,
                    then serve JSON commands on stdin: generate, release, reload, exit

``--vmm`` puts every weight in one region mapped with the CUDA virtual memory API
(cuMemAddressReserve/cuMemCreate/cuMemMap), so "release" can unmap and free the physical
memory while keeping the addresses the CUDA graphs point at, and "reload" maps fresh memory
at the same addresses and streams the weights back from casfs (weights out, graphs in).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

T_START = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

T_IMPORT = time.time()

CFG = dict(vocab=32000, hidden=2048, layers=8, heads=16, inter=5632, max_seq=256, max_batch=16)
TAG, REL = "snapworker", "model.safetensors"


def param_specs(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i = c["hidden"], c["inter"]
    out = [("embed", (c["vocab"], h))]
    for l in range(c["layers"]):
        out += [(f"l{l}_norm1", (h,)), (f"l{l}_wqkv", (3 * h, h)), (f"l{l}_wo", (h, h)),
                (f"l{l}_norm2", (h,)), (f"l{l}_wgu", (2 * i, h)), (f"l{l}_wd", (h, i))]
    out += [("norm", (h,)), ("lm_head", (c["vocab"], h))]
    return out


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Weights(torch.nn.Module):
    """Holds the parameters as buffers named as in the safetensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v)


class VmmRegion:
    """One device region whose physical memory can be released and re-mapped at the same address."""

    def __init__(self, nbytes: int, device: int = 0) -> None:
        from cuda.bindings import driver as d

        self.d = d
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the primary context is current on this thread now
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self.prop = prop
        gran = self._ok(d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        self.size = -(-nbytes // gran) * gran
        self.ptr = self._ok(d.cuMemAddressReserve(self.size, 0, 0, 0))
        self.handle = None
        self.map()

    def _ok(self, res):
        err = res[0]
        if err != self.d.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return res[1] if len(res) > 1 else None

    def map(self) -> None:
        d = self.d
        self.handle = self._ok(d.cuMemCreate(self.size, self.prop, 0))
        self._ok(d.cuMemMap(self.ptr, self.size, 0, self.handle, 0))
        acc = d.CUmemAccessDesc()
        acc.location = self.prop.location
        acc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._ok(d.cuMemSetAccess(self.ptr, self.size, [acc], 1))

    def unmap(self) -> None:
        self._ok(self.d.cuMemUnmap(self.ptr, self.size))
        self._ok(self.d.cuMemRelease(self.handle))
        self.handle = None

    def tensor(self) -> torch.Tensor:
        class _Iface:
            __cuda_array_interface__ = {"shape": (self.size,), "typestr": "|u1",
                                        "data": (int(self.ptr), False), "version": 3}
        return torch.as_tensor(_Iface(), device="cuda")


class Decoder:
    def __init__(self, c: dict, w: dict[str, torch.Tensor]) -> None:
        self.c, self.w = c, w
        h, nh = c["hidden"], c["heads"]
        self.hd = h // nh
        dev = c.get("device", "cuda")
        L, B, S = c["layers"], c["max_batch"], c["max_seq"]
        self.kv = torch.zeros(L, 2, B, nh, S, self.hd, device=dev, dtype=torch.bfloat16)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, device=dev).float() / self.hd))
        ang = torch.outer(torch.arange(S, device=dev).float(), inv)
        self.cos, self.sin = ang.cos(), ang.sin()
        self.tok_in = torch.zeros(B, dtype=torch.long, device=dev)
        self.tok_out = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.ar = torch.arange(S, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.step_fn = self.step

    @staticmethod
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.hd // 2].float(), x[..., self.hd // 2:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def step(self, tok_in: torch.Tensor, tok_out: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor) -> None:
        """One decode step for the batch rows of ``tok_in``: writes tok_out, advances pos."""
        c, w = self.c, self.w
        B = tok_in.shape[0]
        nh, hd = c["heads"], self.hd
        x = w["embed"].index_select(0, tok_in)  # [B, h]
        cos = self.cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(1, 1, 1, -1)
        mask = (self.ar > pos).view(1, 1, 1, -1)
        for l in range(c["layers"]):
            hx = self.rms(x, w[f"l{l}_norm1"])
            q, k, v = (hx @ w[f"l{l}_wqkv"].t()).view(B, 3, nh, 1, hd).unbind(1)
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            kc, vc = kv[l, 0, :B], kv[l, 1, :B]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            s = (q.float() @ kc.float().transpose(-1, -2)) / math.sqrt(hd)
            p = s.masked_fill(mask, float("-inf")).softmax(-1)
            a = (p @ vc.float()).to(x.dtype).reshape(B, nh * hd)
            x = x + a @ w[f"l{l}_wo"].t()
            hx = self.rms(x, w[f"l{l}_norm2"])
            g, u = (hx @ w[f"l{l}_wgu"].t()).chunk(2, -1)
            x = x + (torch.nn.functional.silu(g) * u) @ w[f"l{l}_wd"].t()
        logits = self.rms(x, w["norm"]) @ w["lm_head"].t()
        tok_out.copy_(logits.float().argmax(-1))
        tok_in.copy_(tok_out)
        pos.add_(1)

    def capture(self, B: int) -> None:
        args = (self.tok_in[:B], self.tok_out[:B], self.pos, self.kv)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.pos.zero_()
                self.step_fn(*args)
        torch.cuda.current_stream().wait_stream(s)
        self.pos.zero_()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.step_fn(*args)
        self.graphs[B] = g

    def generate(self, B: int, prompt: torch.Tensor, new: int) -> tuple[list[list[int]], float]:
        """Greedy: feed the prompt through the graph, then ``new`` tokens. Returns (tokens, ttft_s)."""
        t0 = time.perf_counter()
        g = self.graphs[B]
        self.pos.zero_()
        for i in range(prompt.shape[1]):
            self.tok_in[:B].copy_(prompt[:, i])
            g.replay()
        first = self.tok_out[:B].clone()
        first_cpu = first.cpu()  # the first token is on the host: time to first token
        ttft = time.perf_counter() - t0
        hist = [first]
        for _ in range(new - 1):
            g.replay()
            hist.append(self.tok_out[:B].clone())
        toks = torch.stack(hist, 1).cpu().tolist()
        assert toks[0][0] == int(first_cpu[0])
        return toks, ttft


def prompts(B: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + B)
    return torch.randint(0, CFG["vocab"], (B, n), generator=g).cuda()


def prepare(store_dir: str) -> None:
    import tempfile

    from safetensors.torch import save_file

    import casfs

    g = torch.Generator(device="cuda").manual_seed(0)
    t = {}
    for name, shape in param_specs(CFG):
        if len(shape) == 1:
            t[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t[name] = (torch.randn(shape, generator=g, device="cuda") * (1.0 / math.sqrt(shape[-1]))).bfloat16().cpu()
    with tempfile.TemporaryDirectory() as d:
        save_file(t, os.path.join(d, REL))
        with casfs.open_store(store_dir) as s:
            r = casfs.build(s, d, tag=TAG, progress=False)
    emit({"event": "prepared", "bytes": sum(v.nbytes for v in t.values()), "build_s": r.seconds})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--vmm", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    a = ap.parse_args()
    if a.prepare:
        prepare(a.store)
        return
    import casfs
    from snapshot.weights import load_into_module

    marks = {"import_torch": T_IMPORT - T_START}
    t = time.time()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    marks["cuda_init"] = time.time() - t
    specs = param_specs(CFG)
    t = time.time()
    region = None
    if a.vmm:
        sizes = [((math.prod(s) * 2 + 255) // 256) * 256 for _, s in specs]
        region = VmmRegion(sum(sizes))
        buf = region.tensor()
        w, off = {}, 0
        for (name, shape), n in zip(specs, sizes):
            w[name] = buf[off:off + math.prod(shape) * 2].view(torch.bfloat16).view(shape)
            off += n
    else:
        w = {name: torch.empty(shape, dtype=torch.bfloat16, device="cuda") for name, shape in specs}
    module = Weights(w)
    store = casfs.open_store(a.store)
    image = store.open_image(TAG)
    load_into_module(module, image, REL)
    torch.cuda.synchronize()
    marks["weights"] = time.time() - t
    dec = Decoder(CFG, w)
    if a.compile:
        t = time.time()
        dec.step_fn = torch.compile(dec.step, dynamic=False)
        marks["compile_setup"] = time.time() - t
    t = time.time()
    sizes_b = [int(b) for b in a.batch_sizes.split(",")]
    try:
        for B in sizes_b:
            dec.capture(B)
    except Exception as e:  # noqa: BLE001 - report, and fall back to eager graphs
        if not a.compile:
            raise
        marks["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        dec.step_fn = dec.step
        dec.graphs.clear()
        for B in sizes_b:
            dec.capture(B)
    torch.cuda.synchronize()
    marks["capture" if not a.compile else "compile_and_capture"] = time.time() - t
    t = time.time()
    toks, ttft = dec.generate(1, prompts(1), 1)
    marks["first_token"] = time.time() - t
    marks["total_to_first_token"] = time.time() - T_START
    refs = {B: dec.generate(B, prompts(B), 16)[0] for B in sizes_b}
    emit({"event": "ready", "pid": os.getpid(), "t_start": T_START, "marks": marks,
          "refs": refs, "gpu_mem_allocated": torch.cuda.memory_allocated(),
          "gpu_mem_reserved": torch.cuda.memory_reserved(),
          "weights_bytes": sum(v.nbytes for v in w.values())})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        t = time.perf_counter()
        if op == "generate":
            B = int(cmd["batch"])
            toks, ttft = dec.generate(B, prompts(B), int(cmd.get("new", 16)))
            emit({"event": "generated", "batch": B, "tokens": toks, "ttft_s": ttft,
                  "s": time.perf_counter() - t})
        elif op == "release":
            torch.cuda.synchronize()
            region.unmap()
            emit({"event": "released", "bytes": region.size, "s": time.perf_counter() - t})
        elif op == "reload":
            region.map()
            load_into_module(module, image, REL)
            torch.cuda.synchronize()
            emit({"event": "reloaded", "s": time.perf_counter() - t})
        elif op == "exit":
            emit({"event": "bye"})
            break


if __name__ == "__main__":
    main()
