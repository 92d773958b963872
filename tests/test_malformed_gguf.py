"""A corpus of malformed GGUF files: every one must raise a clear exception, none may crash.

The files are built byte by byte from a valid tiny model (re-serialized by the small writer below,
which knows where every section starts), then damaged: truncated at every section, counts and
lengths forged, offsets moved past the end, types, alignment and dimensions made invalid, names
duplicated; plus semantic errors (missing keys and tensors) and random byte mutations."""

import random
import secrets
import struct

import gguf
import numpy as np
import pytest

from sepedge import ModelLoadError, SepedgeError, UnsupportedError
from sepedge._native import Context, Model
from sepedge.convert import convert

VT = gguf.GGUFValueType
SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
          VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def value(vtype, v, sub=None) -> bytes:
    if vtype == VT.STRING:
        return s(v)
    if vtype == VT.ARRAY:
        return struct.pack("<IQ", sub, len(v)) + b"".join(value(sub, x) for x in v)
    return struct.pack(SCALAR[vtype], v)


class Doc:
    """A GGUF file as editable parts: KV entries (key, type, payload) and tensors."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.kvs = []
        for k, f in r.fields.items():
            if k.startswith("GGUF."):
                continue
            vt = f.types[0]
            sub = f.types[1] if vt == VT.ARRAY else None
            self.kvs.append([k, int(vt), value(vt, f.contents(), sub)])
        self.tensors = [[t.name, [int(x) for x in t.shape], int(t.tensor_type), bytes(np.asarray(t.data).tobytes())]
                        for t in r.tensors]
        self.magic, self.version, self.alignment = b"GGUF", 3, 32
        self.n_kv = self.n_tensors = None  # forged counts
        self.offsets: dict[int, int] = {}  # forged tensor offsets, by index

    def build(self) -> tuple[bytes, list[int]]:
        """The bytes, and the offsets where sections start (for truncation)."""
        out = bytearray(self.magic + struct.pack("<IQQ", self.version,
                                                  len(self.tensors) if self.n_tensors is None else self.n_tensors,
                                                  len(self.kvs) if self.n_kv is None else self.n_kv))
        marks = [len(out)]
        for k, vt, payload in self.kvs:
            out += s(k) + struct.pack("<I", vt) + payload
            marks.append(len(out))
        offset = 0
        for i, (name, shape, qtype, data) in enumerate(self.tensors):
            out += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
            out += struct.pack("<IQ", qtype, self.offsets.get(i, offset))
            offset += len(data) + (-len(data) % self.alignment)
            marks.append(len(out))
        out += b"\0" * (-len(out) % self.alignment)
        for _, _, _, data in self.tensors:
            marks.append(len(out))
            out += data + b"\0" * (-len(data) % self.alignment)
        return bytes(out), marks

    def kv(self, key):
        return next(e for e in self.kvs if e[0] == key)


@pytest.fixture(scope="module")
def base(tiny_dirs, tmp_path_factory):
    return convert(tiny_dirs("gqa3-sharded-padded"), tmp_path_factory.mktemp("base") / "base.gguf", outtype="q8_0",
                   progress=False)


def load(data: bytes, path):
    path.write_bytes(data)
    m = Model(path)
    try:  # a file that loads must also run
        with Context(m, n_ctx=8, n_threads=1) as ctx:
            ctx.decode([0, 1, 2])
    finally:
        m.close()


def expect(doc_or_bytes, tmp_path, error=ModelLoadError, match=None):
    data = doc_or_bytes.build()[0] if isinstance(doc_or_bytes, Doc) else doc_or_bytes
    path = tmp_path / "bad.gguf"
    with pytest.raises(error, match=match) as e:
        load(data, path)
    assert str(e.value)  # a message, never an empty error
    return e.value


def test_writer_reproduces_the_file(base, tmp_path):
    data, _ = Doc(base).build()
    assert data == base.read_bytes()
    load(data, tmp_path / "ok.gguf")


def test_truncated_at_every_section(base, tmp_path):
    data, marks = Doc(base).build()
    cuts = sorted({0, 1, 3, 4, 7, 8, 15, 16, 23, *marks, *[m - 1 for m in marks], *[m + 3 for m in marks]})
    for cut in cuts:
        if cut < len(data):
            err = expect(data[:cut], tmp_path)
            assert "bad.gguf" in str(err), (cut, err)


@pytest.mark.parametrize("forge,match", [
    (lambda d: setattr(d, "n_kv", 2 ** 63), "KV count"),
    (lambda d: setattr(d, "n_tensors", 2 ** 63), "tensor count"),
    (lambda d: setattr(d, "n_kv", len(d.kvs) + 5), "malformed GGUF"),
    (lambda d: setattr(d, "n_tensors", len(d.tensors) + 1), "malformed GGUF"),
    (lambda d: d.kv("general.name").__setitem__(2, struct.pack("<Q", 2 ** 63) + b"x"), "truncated string"),
    (lambda d: d.kv("tokenizer.ggml.tokens").__setitem__(2, struct.pack("<IQ", VT.STRING, 2 ** 62)), "longer than the file"),
    (lambda d: d.kv("tokenizer.ggml.token_type").__setitem__(2, struct.pack("<IQ", VT.INT32, 2 ** 61)), "longer than the file"),
    (lambda d: d.kvs.insert(0, [chr(0) * 0 + "k" * 70000, VT.UINT32, struct.pack("<I", 1)]), "key length"),
])
def test_forged_counts_and_lengths(base, tmp_path, forge, match):
    d = Doc(base)
    forge(d)
    expect(d, tmp_path, match=match)


def test_offsets_past_the_end(base, tmp_path):
    for off in (None, 2 ** 64 - 32, 2 ** 40):
        d = Doc(base)
        d.offsets[len(d.tensors) - 1] = off if off is not None else sum(len(t[3]) + (-len(t[3]) % 32) for t in d.tensors)
        expect(d, tmp_path, match="past the end of the file")


def test_bad_types(base, tmp_path):
    d = Doc(base)
    d.kv("general.name")[1] = 99
    expect(d, tmp_path, match="unknown value type")
    d = Doc(base)
    d.kv("tokenizer.ggml.tokens")[2] = struct.pack("<IQ", 77, 0)
    expect(d, tmp_path, match="unknown array element type")
    d = Doc(base)
    d.kvs.append(["x.nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", VT.UINT8, 0)])
    expect(d, tmp_path, UnsupportedError, match="nested")
    for bad in (99, 31, 4, 2 ** 31 + 7):
        d = Doc(base)
        d.tensors[3][2] = bad
        expect(d, tmp_path, match="unknown type")


def test_unsupported_tensor_type(base, tmp_path):
    d = Doc(base)
    name, shape, _, data = next(t for t in d.tensors if t[0] == "blk.0.ffn_gate.weight")
    t = next(t for t in d.tensors if t[0] == name)
    t[1], t[2], t[3] = [256, 1], int(gguf.GGMLQuantizationType.Q4_K), bytes(144)  # a valid Q4_K row, wrong shape too
    err = expect(d, tmp_path, ModelLoadError)
    assert "shape" in str(err) or "Q4_K" in str(err)
    d = Doc(base)
    t = next(t for t in d.tensors if t[0] == "blk.0.ffn_gate.weight")
    n_rows, n_cols = t[1][1], t[1][0]
    t[1] = [n_cols, n_rows]
    t[2], t[3] = int(gguf.GGMLQuantizationType.Q5_1), bytes(n_rows * n_cols // 32 * 24)
    expect(d, tmp_path, UnsupportedError, match="type Q5_1, which sepedge cannot run")


def test_bad_alignment(base, tmp_path):
    for bad in (3, 0, 1 << 30):
        d = Doc(base)
        d.kvs.append(["general.alignment", VT.UINT32, struct.pack("<I", bad)])
        expect(d, tmp_path, match="alignment")
    d = Doc(base)
    d.kvs.append(["general.alignment", VT.STRING, s("32")])
    expect(d, tmp_path, match="alignment")
    d = Doc(base)
    d.offsets[2] = 16
    expect(d, tmp_path, match="not aligned")


def test_duplicates(base, tmp_path):
    d = Doc(base)
    d.kvs.append(list(d.kv("general.name")))
    expect(d, tmp_path, match="duplicate key 'general.name'")
    d = Doc(base)
    d.tensors.append(list(d.tensors[1]))
    expect(d, tmp_path, match=f"duplicate tensor '{d.tensors[1][0]}'")


def test_bad_dimensions(base, tmp_path):
    for shape, match in (([], "dimensions"), ([1, 1, 1, 1, 1], "dimensions"), ([96, 0], "dimension out of range"),
                         ([2 ** 62, 2 ** 62], "dimension out of range"), ([33, 96], "do not split")):
        d = Doc(base)
        t = next(t for t in d.tensors if t[2] == int(gguf.GGMLQuantizationType.Q8_0))
        t[1] = shape
        expect(d, tmp_path, match=match)
    d = Doc(base)
    d.tensors[0][0] = "x" * 64
    expect(d, tmp_path, match="name length")


def test_not_gguf(tmp_path):
    expect(b"", tmp_path, match="empty")
    expect(b"GGML" + bytes(60), tmp_path, match="bad magic")
    expect(b"GGUF" + struct.pack("<IQQ", 1, 0, 0), tmp_path, UnsupportedError, match="version 1")
    expect(b"GGUF" + struct.pack("<IQQ", 4, 0, 0), tmp_path, UnsupportedError, match="version 4")
    expect(b"GGUF" + struct.pack("<IQQ", 3, 0, 0), tmp_path, match="general.architecture")


@pytest.mark.parametrize("edit,error,match", [
    (lambda d: d.kvs.remove(d.kv("general.architecture")), ModelLoadError, "missing key 'general.architecture'"),
    (lambda d: d.kv("general.architecture").__setitem__(2, s("gpt2")), UnsupportedError, "architecture 'gpt2'"),
    (lambda d: d.tensors.pop(5), ModelLoadError, "missing tensor"),
    (lambda d: d.kvs.remove(d.kv("llama.block_count")), ModelLoadError, "missing key 'llama.block_count'"),
    (lambda d: d.kv("llama.block_count").__setitem__(slice(1, 3), [VT.STRING, s("3")]), ModelLoadError, "not an integer"),
    (lambda d: d.kv("llama.block_count").__setitem__(2, struct.pack("<I", 9)), ModelLoadError, "missing tensor 'blk.3"),
    (lambda d: d.kv("llama.attention.head_count").__setitem__(2, struct.pack("<I", 0)), ModelLoadError, "out of range"),
    (lambda d: d.kv("llama.attention.head_count_kv").__setitem__(2, struct.pack("<I", 2)), ModelLoadError, "multiple"),
    (lambda d: d.kv("llama.embedding_length").__setitem__(2, struct.pack("<I", 95)), ModelLoadError, "token_embd"),
    (lambda d: d.kv("llama.attention.layer_norm_rms_epsilon").__setitem__(2, struct.pack("<f", float("nan"))),
     ModelLoadError, "NaN"),
    (lambda d: d.kv("tokenizer.ggml.tokens").__setitem__(2, value(VT.ARRAY, ["a", "b"], VT.STRING)), ModelLoadError,
     "tokens in the vocabulary"),
    (lambda d: d.kv("sepllm.separator_token_ids").__setitem__(2, value(VT.ARRAY, [5, 10 ** 6], VT.UINT32)),
     ModelLoadError, "separator id 1000000"),
    (lambda d: d.kv("llama.rope.dimension_count").__setitem__(2, struct.pack("<I", 16)), UnsupportedError, "partial RoPE"),
])
def test_semantic_errors(base, tmp_path, edit, error, match):
    d = Doc(base)
    edit(d)
    expect(d, tmp_path, error, match=match)


def test_random_mutations_never_crash(base, tmp_path):
    """Mutate bytes of the header and metadata: every result loads and runs, or raises."""
    data, marks = Doc(base).build()
    header_end = marks[-len(Doc(base).tensors)]  # where the tensor data starts
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    failures = 0
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(header_end)
            if rng.random() < 0.5:
                buf[pos] = rng.randrange(256)
            else:
                buf[pos:pos + 8] = struct.pack("<Q", rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]))
        try:
            load(bytes(buf[:len(data)]), tmp_path / "m.gguf")
        except SepedgeError:
            failures += 1
    assert failures > 100, f"seed {seed}: mutations were mostly accepted"
