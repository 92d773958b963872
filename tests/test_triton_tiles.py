"""The measured tile table of the decode products (kernels/tile_table.py) and the pure parts of its sweep
(benchmarks/triton_decode_tiles.py): reading a table and every kind of malformed one, SEPEDGE_TRITON_TILES,
the lookup, that a hit launches exactly the table's tile with the autotune path's grid and gives the autotune
path's numbers, the keys one decode step of a tiny model asks for, and the table writer and merger.

Without a GPU the kernels run through Triton's interpreter, which never autotunes: the launches are sent
down the GPU's branch (matvec.TUNE_DEVICES) with small candidate lists, so that a table hit, a miss and the
autotuner (one candidate: nothing to time) all run on CPU tensors."""

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import below

pytest.importorskip("triton")
import triton  # noqa: E402

from sepedge import SepedgeError  # noqa: E402
from sepedge import kernels as K  # noqa: E402
from sepedge.kernels import quants as Q  # noqa: E402

M = importlib.import_module("sepedge.kernels.matvec")  # the package's `matvec` is the function
T = importlib.import_module("sepedge.kernels.tile_table")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import triton_decode_tiles as S  # noqa: E402
import triton_tiles_ab as AB  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DOT_REL = 2e-5  # test_triton_kernels.py's: float32 sums against float64, relative to sum |w x| of a row


@pytest.fixture
def fresh(monkeypatch):
    """No table read yet in this process, nothing served, no SEPEDGE_TRITON_TILES, no autotuner made."""
    monkeypatch.setattr(T, "_active", None)
    monkeypatch.setattr(T, "_served", {})
    monkeypatch.delenv(T.TILES_ENV, raising=False)
    monkeypatch.delenv(M.Q4K_ENV, raising=False)
    monkeypatch.delenv(M.TUNE_ENV, raising=False)
    monkeypatch.setattr(M, "_tuned", {})


def entry(kernel="q4_0", variant=False, N=4096, nblk=128, add=False, glu=False, norm=False, config=None, **more):
    return {"kernel": kernel, "variant": variant, "N": N, "nblk": nblk, "HAS_ADD": add, "GLU": glu, "NORM": norm,
            "config": config or {"BLOCK_N": 8, "NB": 16, "num_warps": 4}, "us": 5.5, "runner_up_us": 5.9, **more}


def good_doc() -> dict:
    return {"gpu": "NVIDIA H200", "triton": triton.__version__, "torch": torch.__version__,
            "made": "2026-12-02T10:00:00+00:00", "command": "python3 benchmarks/triton_decode_tiles.py m.gguf",
            "entries": [entry(),
                        entry(add=True, config={"BLOCK_N": 4, "NB": 32, "num_warps": 4}),
                        entry("q4_k", True, 28672, 16, glu=True,
                              config={"BLOCK_N": 128, "NB": 1, "num_warps": 8, "STAGES": 1, "PAIR": 1}),
                        entry("q6_k", True, 1024, 16, config={"BLOCK_N": 16, "NB": 2, "num_warps": 4, "STAGES": 3}),
                        entry("q6_k", False, 128256, 16, config={"BLOCK_N": 32, "NB": 1, "num_warps": 4},
                              runner_up_us=None)]}


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_gpu_slug():
    assert T.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert T.gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert T.gpu_slug(" NVIDIA A100-SXM4-80GB ") == "nvidia-a100-sxm4-80gb"


def test_load_a_good_table(tmp_path):
    tiles = T.load(write(tmp_path / "t.json", good_doc()))
    assert tiles == {
        (Q.Q4_0, False, 4096, 128, False, False, False): {"BLOCK_N": 8, "NB": 16, "num_warps": 4},
        (Q.Q4_0, False, 4096, 128, True, False, False): {"BLOCK_N": 4, "NB": 32, "num_warps": 4},
        (Q.Q4_K, True, 28672, 16, False, True, False): {"BLOCK_N": 128, "NB": 1, "num_warps": 8, "STAGES": 1,
                                                        "PAIR": 1},
        (Q.Q6_K, True, 1024, 16, False, False, False): {"BLOCK_N": 16, "NB": 2, "num_warps": 4, "STAGES": 3},
        (Q.Q6_K, False, 128256, 16, False, False, False): {"BLOCK_N": 32, "NB": 1, "num_warps": 4}}


def _set(path, value):
    """A mutation of the good table: the field at `path` (keys and indices) set to value, or removed."""
    def f(doc):
        *head, last = path
        obj = doc
        for k in head:
            obj = obj[k]
        if value is _set:
            del obj[last]
        else:
            obj[last] = value
        return doc
    return f


def _dup(doc):
    doc["entries"].append(copy.deepcopy(doc["entries"][0]))
    return doc


# (what is wrong, the mutation, the fault the message names)
MALFORMED = [
    ("not JSON", lambda d: '{"gpu": "x", ', "not JSON"),
    ("not an object", lambda d: [d], "not a JSON object"),
    ("no gpu", _set(["gpu"], _set), "no field 'gpu'"),
    ("entries not a list", _set(["entries"], {"a": 1}), "'entries' is .* not list"),
    ("entry not an object", _set(["entries", 0], 7), "entry 0: not an object"),
    ("no N", _set(["entries", 1, "N"], _set), "entry 1: no field 'N'"),
    ("N a string", _set(["entries", 0, "N"], "4096"), "entry 0: 'N' is \"4096\", not int"),
    ("N a bool", _set(["entries", 0, "N"], True), "entry 0: 'N' is true, not int"),
    ("N zero", _set(["entries", 0, "N"], 0), "entry 0: N 0, nblk 128: not a shape"),
    ("a flag 1", _set(["entries", 0, "HAS_ADD"], 1), "entry 0: 'HAS_ADD' is 1, not bool"),
    ("variant a string", _set(["entries", 2, "variant"], "1"), "entry 2: 'variant' is \"1\", not bool"),
    ("us missing", _set(["entries", 0, "us"], _set), "entry 0: no field 'us'"),
    ("us a string", _set(["entries", 0, "us"], "fast"), "entry 0: 'us' is \"fast\""),
    ("runner-up a string", _set(["entries", 0, "runner_up_us"], "x"), "entry 0: 'runner_up_us' is \"x\""),
    ("unknown kernel", _set(["entries", 0, "kernel"], "q5_k"), "entry 0: kernel 'q5_k' is not one of"),
    ("variant of q4_0", _set(["entries", 0, "variant"], True), "entry 0: q4_0 has no variant"),
    ("variant q6_k GLU", _set(["entries", 3, "GLU"], True), "entry 3: q6_k has no variant kernel or tiles for GLU"),
    ("GLU and NORM", lambda d: _set(["entries", 0, "NORM"], True)(_set(["entries", 0, "GLU"], True)(d)),
     "entry 0: GLU and NORM together"),
    ("config not an object", _set(["entries", 0, "config"], [8, 16, 4]), "entry 0: config \\[8, 16, 4\\] is not an"),
    ("config without NB", _set(["entries", 0, "config", "NB"], _set), "entry 0: no field 'NB'"),
    ("tile not a power of two", _set(["entries", 0, "config", "BLOCK_N"], 12),
     "entry 0: config BLOCK_N 12 is not a power of two"),
    ("warps not a power of two", _set(["entries", 0, "config", "num_warps"], 6),
     "entry 0: config num_warps 6 is not a power of two"),
    ("not a candidate", _set(["entries", 0, "config"], {"BLOCK_N": 2, "NB": 2, "num_warps": 2}),
     "entry 0: config .* is not among the launch's candidates"),
    ("STAGES where the kernel takes none", _set(["entries", 0, "config", "STAGES"], 1),
     "entry 0: config .* is not among the launch's candidates"),
    ("PAIR 2", _set(["entries", 2, "config", "PAIR"], 2), "entry 2: config PAIR 2 is out of range"),
    ("unknown config field", _set(["entries", 0, "config", "BLOCK_K"], 64), "entry 0: config has unknown fields"),
    ("PF 2", _set(["entries", 4, "config", "PF"], 2), "entry 4: config PF 2 is out of range"),
    ("PF of q4_0", _set(["entries", 0, "config", "PF"], 1), "entry 0: q4_0 takes no PF"),
    ("PF of the v2 kernel", _set(["entries", 2, "config", "PF"], 1), "entry 2: q4_k \\(variant\\) takes no PF"),
    ("PF of the staged q6_k tiles", _set(["entries", 3, "config", "PF"], 1), "entry 3: q6_k \\(variant\\) takes no PF"),
    ("PAIR where the kernel takes STAGES", _set(["entries", 3, "config"], {"BLOCK_N": 16, "NB": 2, "num_warps": 4,
                                                                          "PAIR": 0}),
     "entry 3: config .* is not among the launch's candidates"),
    ("a GLU tile of half blocks", lambda d: _set(["entries", 2, "config"], {"BLOCK_N": 32, "NB": 1, "num_warps": 8,
                                                                            "STAGES": 1, "PAIR": 0})(
        _set(["extra"], [{"BLOCK_N": 32, "NB": 1, "num_warps": 8, "STAGES": 1, "PAIR": 0}])(d)),
     "entry 2: config BLOCK_N 32 of a GLU launch is not a multiple of 64"),
    ("a key twice", _dup, "entry 5: a second entry for q4_0 N=4096 nblk=128 HAS_ADD=0 GLU=0 NORM=0"),
    ("extra not a config", _set(["extra"], [{"BLOCK_N": 3, "NB": 1, "num_warps": 4}]),
     "extra 0: config BLOCK_N 3 is not a power of two"),
]


@pytest.mark.parametrize("mutate, fault", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_tables(tmp_path, mutate, fault):
    path = write(tmp_path / "bad.json", mutate(good_doc()))
    with pytest.raises(T.TileTableError, match=fault) as e:
        T.load(path)
    assert str(e.value).startswith(f"{path}: ")  # the file, then the fault
    assert isinstance(e.value, SepedgeError)


def test_extra_configs_are_candidates(tmp_path):
    """A tile the sweep measured beyond the autotuners' lists (--extra) is accepted where the table lists it
    under "extra", and only for launches whose kernel takes its parameters."""
    doc = good_doc()
    doc["entries"][0]["config"] = {"BLOCK_N": 2, "NB": 2, "num_warps": 2}
    with pytest.raises(T.TileTableError, match="not among"):
        T.load(write(tmp_path / "t.json", doc))
    doc["extra"] = [{"BLOCK_N": 2, "NB": 2, "num_warps": 2}]
    assert T.load(write(tmp_path / "t.json", doc))[Q.Q4_0, False, 4096, 128, False, False, False]["NB"] == 2
    doc["entries"][3]["config"] = {"BLOCK_N": 2, "NB": 2, "num_warps": 2}  # Q6_K staged: STAGES needed
    with pytest.raises(T.TileTableError, match="entry 3: .*not among"):
        T.load(write(tmp_path / "t.json", doc))


def test_table_path_from_the_environment(tmp_path, monkeypatch, fresh):
    monkeypatch.setattr(T, "TILES_DIR", tmp_path / "tiles")
    assert T.table_path("NVIDIA H200") is None  # no table of this GPU: autotune
    (tmp_path / "tiles").mkdir()
    own = write(tmp_path / "tiles" / "nvidia-h200.json", good_doc())
    assert T.table_path("NVIDIA H200") == own
    assert T.table_path("NVIDIA H100 80GB HBM3") is None
    monkeypatch.setenv(T.TILES_ENV, "")
    assert T.table_path("NVIDIA H200") == own
    monkeypatch.setenv(T.TILES_ENV, "0")
    assert T.table_path("NVIDIA H200") is None
    other = write(tmp_path / "other.json", good_doc())
    monkeypatch.setenv(T.TILES_ENV, str(other))
    assert T.table_path("NVIDIA H200") == other
    monkeypatch.setenv(T.TILES_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(T.TileTableError, match=f"{tmp_path / 'missing.json'}: no such file"):
        T.table_path("NVIDIA H200")


def test_lookup_hit_miss_and_read_once(tmp_path, monkeypatch, fresh):
    path = write(tmp_path / "t.json", good_doc())
    monkeypatch.setenv(T.TILES_ENV, str(path))
    hit = (Q.Q4_0, False, 4096, 128, True, False, False)
    assert T.lookup(DEVICE, *hit) == {"BLOCK_N": 4, "NB": 32, "num_warps": 4}
    assert T.lookup(DEVICE, Q.Q4_0, False, 4096, 128, True, False, True) is None  # NORM: another key
    assert T.lookup(DEVICE, Q.Q4_K, False, 28672, 16, False, True, False) is None  # not the variant
    assert T.served() == (path, {hit: {"BLOCK_N": 4, "NB": 32, "num_warps": 4}})
    write(path, "broken")  # read once a process: the table in use stays
    monkeypatch.setenv(T.TILES_ENV, "0")
    assert T.lookup(DEVICE, *hit)["NB"] == 32


def test_a_malformed_table_fails_the_launch(tmp_path, monkeypatch, fresh):
    monkeypatch.setenv(T.TILES_ENV, str(write(tmp_path / "t.json", "[")))
    with pytest.raises(T.TileTableError, match="not JSON"):
        T.lookup(DEVICE, Q.Q4_0, False, 4096, 128, False, False, False)


class Recorder:
    """Stands for a kernel: records each launch's grid and meta-parameters, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append((grid, {k: v for k, v in kw.items() if k in M.TILE_PARAMS or k == "PF"}))
            return self.kernel[grid](*args, **kw)
        return launch


# (type, alt, GLU, NORM, HAS_ADD, N (stacked gate/up for GLU), K, the pinned tile, the candidate list patched)
CASES = [
    (Q.Q4_0, False, False, False, True, 40, 8 * 32, (8, 4, 2), ("TUNE_CONFIGS", 32, [(4, 2, 4), (8, 4, 2)])),
    (Q.Q4_K, True, True, False, False, 128, 512, (128, 1, 8, 1, 1),
     ("Q4K_V2_GLU_TUNE_CONFIGS", None, [(64, 1, 8, 1, 0), (128, 1, 8, 1, 1)])),
    (Q.Q6_K, False, False, True, True, 96, 512, (32, 2, 4), ("TUNE_CONFIGS", 256, [(16, 1, 4), (32, 2, 4)])),
]


def _launch(qtype, glu, norm, add, p, xa, N):
    """The product as the backend calls it: (y, the 8-bit output of GLU or NORM or None)."""
    if glu:
        h, gu = K.matvec_glu(p, qtype, xa, keep_gate_up=True)
        return gu, h
    if norm:
        res = torch.linspace(-1, 1, N, device=DEVICE)[None]
        tickets = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        return K.matvec_norm(p, qtype, xa, res, torch.full((N,), 1.25, device=DEVICE), 1e-5, tickets)
    res = torch.linspace(-1, 1, N, device=DEVICE)[None] if add else None
    return M.matvec_q8(p, qtype, xa, res, N if add else 0), None


@pytest.mark.parametrize("qtype, alt, glu, norm, add, N, n_cols, pinned, table", CASES,
                         ids=["q4_0-add", "q4_k-v2-glu", "q6_k-norm"])
def test_a_hit_launches_the_pinned_tile(tmp_path, monkeypatch, fresh, qtype, alt, glu, norm, add, N, n_cols, pinned,
                                        table):
    """Down the GPU's branch of _packed_launch: a table hit launches the plain kernel once, with exactly the
    table's meta-parameters and the autotune path's grid; its numbers equal the autotuner's with the same tile
    (its only candidate), bit for bit, and the float64 product within DOT_REL; a miss autotunes."""
    name, block, configs = table
    if block is None:
        monkeypatch.setattr(M, name, configs)
    else:
        monkeypatch.setitem(getattr(M, name), block, configs)
    monkeypatch.setattr(M, "TUNE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(M, "TUNE_MIN_SIZE", 0)
    if alt:
        monkeypatch.setenv(M.Q4K_ENV, "1")
    assert M.tune_alt(qtype, glu) == alt
    g = torch.Generator().manual_seed(5)
    w = torch.randint(0, 256, (N, K.row_bytes(qtype, n_cols)), dtype=torch.uint8, generator=g)
    scales = {Q.Q4_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]
    b = w.view(N, -1, Q.BLOCKS[qtype][1])
    for off in scales:
        b[..., off:off + 2] = (torch.randn(b.shape[:2], generator=g) * 0.01).half().view(torch.uint8).view(
            *b.shape[:2], 2)
    p = K.pack(w.to(DEVICE), qtype, n_cols)
    x = torch.randn(1, n_cols, generator=g).to(DEVICE)
    xa = K.act_q8(x)
    nblk = n_cols // Q.BLOCKS[qtype][0]
    cfg = dict(zip(M.TILE_PARAMS, pinned))
    doc = good_doc()
    doc["entries"] = [entry(K.NAMES[qtype].lower(), alt, N, nblk, add, glu, norm, config=cfg)]
    monkeypatch.setenv(T.TILES_ENV, str(write(tmp_path / "t.json", doc)))
    kernel = M.matvec_q4_k_v2_kernel if alt and qtype == Q.Q4_K else M.PACKED[qtype][0]
    rec = Recorder(kernel)
    if alt and qtype == Q.Q4_K:
        monkeypatch.setattr(M, "matvec_q4_k_v2_kernel", rec)
    else:
        monkeypatch.setitem(M.PACKED, qtype, (rec, *M.PACKED[qtype][1:]))

    y, h = _launch(qtype, glu, norm, add, p, xa, N)
    per = 2 if glu else 1
    assert rec.launches == [((triton.cdiv(N // per, pinned[0] // per), 1), cfg)]
    assert M._tuned == {}  # the autotuner was never asked
    assert list(T.served()[1].values()) == [cfg]

    # the autotune path with the pinned tile as its only candidate: the same numbers
    if alt and qtype == Q.Q4_K:
        monkeypatch.setattr(M, "matvec_q4_k_v2_kernel", kernel)
    else:
        monkeypatch.setitem(M.PACKED, qtype, (kernel, *M.PACKED[qtype][1:]))
    monkeypatch.setattr(T, "_active", (None, {}))  # a table without the key: a miss
    if block is None:
        monkeypatch.setattr(M, name, [pinned])
    else:
        monkeypatch.setitem(getattr(M, name), block, [pinned])
    y2, h2 = _launch(qtype, glu, norm, add, p, xa, N)
    assert list(M._tuned) == [(qtype, glu, alt)]
    assert torch.equal(y, y2)
    if h is not None:
        for f in ("q", "d", "s"):
            assert torch.equal(getattr(h, f), getattr(h2, f))
    # and both the product they compute
    xd = (xa.q.float().view(1, -1, 32) * xa.d[..., None]).view(1, -1).double().cpu()
    wf = K.dequantize_packed_ref(p).double().cpu()
    ref = xd @ wf.T
    got = y.double().cpu()
    if add or norm:
        got = got - torch.linspace(-1, 1, N)[None].double()
    scale = (xd.abs() @ wf.abs().T)
    assert ((got - ref).abs() <= DOT_REL * scale + 1e-6).all()


def test_tuned_configs_lists_the_table(tmp_path, monkeypatch, fresh):
    """kernels.tuning.tuned_configs (what a benchmark records beside its rates) names the table's file and
    each key it served."""
    from sepedge.kernels.tuning import tuned_configs
    monkeypatch.setattr(importlib.import_module("sepedge.kernels.matmul"), "_tuned", {})
    assert tuned_configs() == {}
    path = write(tmp_path / "t.json", good_doc())
    monkeypatch.setenv(T.TILES_ENV, str(path))
    T.lookup(DEVICE, Q.Q4_K, True, 28672, 16, False, True, False)
    assert tuned_configs() == {f"tiles:{path}": {
        "q4_k alt N=28672 nblk=16 HAS_ADD=0 GLU=1 NORM=0": "BLOCK_N: 128, NB: 1, num_warps: 8, STAGES: 1, PAIR: 1"}}


# ---------------------------------------------------------------------------------------------
# benchmarks/triton_decode_tiles.py


def test_candidates_and_extra():
    key = (Q.Q4_K, True, 28672, 16, False, True, False)
    extra = [(256, 1, 16, 1, 0), (32, 1, 8, 1, 0), (8, 4, 4), M.Q4K_V2_GLU_TUNE_CONFIGS[0]]
    got = S.candidates(key, extra)
    # the autotuner's list, then the extra tiles of the kernel's parameters that a GLU program can own
    assert got == list(M.Q4K_V2_GLU_TUNE_CONFIGS) + [(256, 1, 16, 1, 0)]
    assert S.parse_extra("8,4,4; 16,2,4,1,1;") == [(8, 4, 4), (16, 2, 4, 1, 1)]


@pytest.mark.parametrize("key, tile", [
    ((Q.Q4_0, False, 64, 8, True, False, False), (8, 4, 2)),
    ((Q.Q4_K, False, 128, 1, False, True, False), (64, 1, 4)),
    ((Q.Q6_K, False, 96, 2, True, False, True), (32, 2, 4))], ids=["q4_0-add", "q4_k-glu", "q6_k-norm"])
def test_sweep_launches_as_decode(monkeypatch, fresh, key, tile):
    """The sweep's random weight has finite values, and its launcher goes down the table's path of
    _packed_launch with the tile under test as the table's: one launch of the plain kernel, that tile, the
    key's flags."""
    qtype, alt, N, nblk, add, glu, norm = key
    monkeypatch.setattr(M, "TUNE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(M, "TUNE_MIN_SIZE", 0)
    monkeypatch.setitem(M.GLU_TUNE_CONFIGS if glu else M.TUNE_CONFIGS, Q.BLOCKS[qtype][0], [tile])
    w = S.random_packed(qtype, N, nblk * Q.BLOCKS[qtype][0], DEVICE)
    assert w.shape == (N, nblk * Q.BLOCKS[qtype][0]) and torch.isfinite(K.dequantize_packed_ref(w)).all()
    cfg = dict(zip(M.TILE_PARAMS, tile))
    seen = []
    monkeypatch.setattr(T, "lookup", lambda *k: seen.append(k[1:]) or cfg)
    kernel = M.PACKED[qtype][0]
    rec = Recorder(kernel)
    monkeypatch.setitem(M.PACKED, qtype, (rec, *M.PACKED[qtype][1:]))
    S.launcher(key, DEVICE)(w)
    assert seen == [key]
    assert [m for _, m in rec.launches] == [cfg]


def test_table_writer_and_merger_round_trip(tmp_path):
    versions = ("3.4.0", "2.8.0")
    k1, k2, k3 = ((Q.Q4_0, False, 6144, 128, False, False, False), (Q.Q6_K, False, 128256, 16, False, False, False),
                  (Q.Q4_K, True, 4096, 16, True, False, True))
    c1, c2 = {"BLOCK_N": 8, "NB": 16, "num_warps": 4}, {"BLOCK_N": 32, "NB": 1, "num_warps": 4}
    c3 = {"BLOCK_N": 64, "NB": 1, "num_warps": 4, "STAGES": 1, "PAIR": 1}
    path = tmp_path / "tiles" / "gpu.json"
    S.write_table(path, S.table_doc([S.entry(k1, c1, 4.25, 4.5), S.entry(k2, c2, 180.0, None)], [], "cmd a",
                                    "NVIDIA H200", versions))
    assert T.load(path) == {k1: c1, k2: c2}
    first = json.loads(path.read_text())
    assert (first["gpu"], first["triton"], first["torch"], first["command"]) == ("NVIDIA H200", *versions, "cmd a")
    assert "extra" not in first
    # a second model's keys merged in: k2 measured again replaces the old entry, k3 is new, k1 kept
    c2b = {"BLOCK_N": 16, "NB": 2, "num_warps": 4}
    extra = [{"BLOCK_N": 2, "NB": 64, "num_warps": 4}]
    S.write_table(path, S.table_doc([S.entry(k2, c2b, 170.0, 171.0), S.entry(k3, c3, 9.0, 9.5)], extra, "cmd b",
                                    "NVIDIA H200", versions, merge=first))
    assert T.load(path) == {k1: c1, k2: c2b, k3: c3}
    second = json.loads(path.read_text())
    assert second["command"] == "cmd a; cmd b" and second["extra"] == extra
    assert [e["us"] for e in second["entries"]] == [4.25, 170.0, 9.0]
    assert not list(path.parent.glob("*.tmp"))


def test_decode_keys_of_a_tiny_model(gguf_path, monkeypatch, fresh):
    """The keys one decode step asks the table for, per SEPEDGE_TRITON_FUSE: every repacked product of the
    model (the backend's stacked Q/K/V and gate/up), the residual products with HAS_ADD, and with FUSE 1 the
    gate/up product's GLU and the residual products' NORM epilogues; launches a step per key."""
    from sepedge.triton_backend import TritonWeights
    monkeypatch.setattr(M, "TUNE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(M, "TUNE_MIN_SIZE", 0)
    for block in (32, 256):  # one block a step (the tiny rows have few), few programs (the interpreter's cost)
        monkeypatch.setitem(M.TUNE_CONFIGS, block, [(256, 1, 4)])
        monkeypatch.setitem(M.GLU_TUNE_CONFIGS, block, [(512, 1, 4)])
    path = gguf_path("gqa-d128-llama31", "q4_k_m")
    W = TritonWeights(path)
    lookup = T.lookup
    for fuse in ("attn", "1"):
        want: dict = {}
        for name, (w, qtype, n_cols) in W.w.items():
            if not isinstance(w, K.Packed) or name == "token_embd.weight":
                continue
            role = name.split(".")[-2]
            add = role in ("attn_output", "ffn_down")
            key = (qtype, False, w.shape[0], n_cols // Q.BLOCKS[qtype][0], add, fuse == "1" and role == "ffn_gateup",
                   fuse == "1" and add)
            want[key] = want.get(key, 0) + 1
        assert {Q.Q4_K, Q.Q6_K} <= {k[0] for k in want}  # the file has both types
        assert S.decode_keys(str(path), fuse) == want
    assert os.environ.get("SEPEDGE_TRITON_FUSE") is None and os.environ.get("SEPEDGE_TRITON_GRAPHS") is None
    assert T.lookup is lookup and T.served()[1] == {}  # the table's lookup back, nothing served


def test_ab_summary():
    """benchmarks/triton_tiles_ab.py's table: a process's t/s is the mean of its runs, an arm's mean and sd are
    over its processes, the ratio of the arms' means; how many tile sets an arm's processes ran and how
    many keys the table served each."""
    tiles = {"tiles:/t.json": {"a": "x", "b": "y"}}
    arms = {"table": [{"runs": [270.0, 272.0], "configs": tiles}, {"runs": [274.0, 276.0], "configs": tiles}],
            "autotune": [{"runs": [260.0, 260.0], "configs": {"matvec:k:v": {"1": "A"}}},
                         {"runs": [280.0, 280.0], "configs": {"matvec:k:v": {"1": "B"}}}]}
    text = AB.summary("/m/llama3-8b-q4_k_m.gguf", arms, 2, 128)
    assert "| table | 271.0, 275.0 | 273.0 | 2.8 | 1.4 | 1 |" in text
    assert "| autotune | 260.0, 280.0 | 270.0 | 14.1 | 0.0 | 2 |" in text
    assert "table / autotune: 1.011" in text
    assert "- table: keys served by the table per process: [2, 2]" in text
    assert "- autotune: keys served by the table per process: none" in text


def test_session_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "triton_session.sh")], check=True)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=["q4_k", "q6_k"])
def test_a_hit_with_prefetch(tmp_path, monkeypatch, fresh, qtype):
    """A table entry with PF 1 (the K-quant kernels' next step's loads ahead of the sums) loads, and its hit
    launches the plain kernel with PF 1: the same numbers as PF 0's launch, bit for bit."""
    monkeypatch.setattr(M, "TUNE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(M, "TUNE_MIN_SIZE", 0)
    monkeypatch.setitem(M.TUNE_CONFIGS, 256, [(16, 1, 4), (32, 2, 4)])
    N, n_cols = 96, 768
    rng = torch.Generator().manual_seed(7)
    w = torch.randint(0, 256, (N, K.row_bytes(qtype, n_cols)), dtype=torch.uint8, generator=rng)
    b = w.view(N, -1, Q.BLOCKS[qtype][1])
    for off in {Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]:
        b[..., off:off + 2] = (torch.randn(b.shape[:2], generator=rng) * 0.01).half().view(torch.uint8).view(
            *b.shape[:2], 2)
    p = K.pack(w.to(DEVICE), qtype, n_cols)
    xa = K.act_q8(torch.randn(1, n_cols, generator=rng).to(DEVICE))
    rec = Recorder(M.PACKED[qtype][0])
    monkeypatch.setitem(M.PACKED, qtype, (rec, *M.PACKED[qtype][1:]))
    ys = []
    for pf in (1, 0):
        doc = good_doc()
        cfg = {"BLOCK_N": 32, "NB": 2, "num_warps": 4, "PF": pf}
        doc["entries"] = [entry(K.NAMES[qtype].lower(), False, N, n_cols // 256, config=cfg)]
        path = write(tmp_path / f"pf{pf}.json", doc)
        assert T.load(path)[(qtype, False, N, n_cols // 256, False, False, False)] == cfg
        monkeypatch.setenv(T.TILES_ENV, str(path))
        monkeypatch.setattr(T, "_active", None)
        ys.append(M.matvec_q8(p, qtype, xa))
        assert rec.launches[-1] == ((3, 1), cfg)
    assert M._tuned == {}
    assert torch.equal(ys[0], ys[1])


def test_the_shipped_tables_load():
    """Every table the package ships reads back against today's candidate lists (a tile taken out of a
    TUNE_CONFIGS list would otherwise fail every decode launch on that GPU, and no CPU run would see it)."""
    tables = sorted(T.TILES_DIR.glob("*.json"))
    assert tables, f"no table in {T.TILES_DIR}"
    for path in tables:
        doc = json.loads(path.read_text())
        assert T.gpu_slug(doc["gpu"]) == path.stem, f"{path}: made on {doc['gpu']}"
        assert len(T.load(path)) == len(doc["entries"])


def test_prefetch_and_stages_are_exclusive():
    """PF 1 with pipeline stages > 1 (Q6_K's staged tiles) is refused, not run as one of the two silently."""
    N, n_cols = 64, 512
    w = torch.zeros((N, K.row_bytes(Q.Q6_K, n_cols)), dtype=torch.uint8, device=DEVICE)
    xa = K.act_q8(torch.ones(1, n_cols, device=DEVICE))
    with pytest.raises(ValueError, match="PF and pipeline stages"):
        M.matvec_q8(w, Q.Q6_K, xa, block_n=8, nb=2, stages=3, prefetch=1)
