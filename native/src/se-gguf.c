// GGUF reader over a read-only mapping.
//
// Nothing read from the file is trusted: every count, length, type, dimension and offset is checked
// against the bytes that remain and against the file size before it is used, with overflow-safe
// arithmetic, so a malformed file yields SE_ERR_FORMAT with a message and never a crash.
// Layout (GGUF v2/v3, little-endian): magic, version, n_tensors, n_kv, the KV pairs, the tensor
// infos, padding to the alignment, then the tensor data.
#include "se-impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u  // "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32

typedef struct cursor {
    const uint8_t * base;
    const uint8_t * p;
    const uint8_t * end;
    const char * path;
} cursor;

static int fail(const cursor * c, const char * what) {
    return se_error(SE_ERR_FORMAT, "%s: malformed GGUF: %s (at byte %llu)", c->path, what,
                    (unsigned long long) (c->p - c->base));
}

static uint64_t left(const cursor * c) { return (uint64_t) (c->end - c->p); }

// Readers return false (with the error recorded) when the bytes are not there.
static bool rd(cursor * c, void * dst, uint64_t n, const char * what) {
    if (left(c) < n) {
        fail(c, what);
        return false;
    }
    memcpy(dst, c->p, n);
    c->p += n;
    return true;
}

static bool rd_str(cursor * c, const char ** s, uint64_t * len, const char * what) {
    uint64_t n;
    if (!rd(c, &n, 8, what)) return false;
    if (left(c) < n) {
        fail(c, what);
        return false;
    }
    *s = (const char *) c->p;
    *len = n;
    c->p += n;
    return true;
}

static uint64_t value_size(int32_t type) {
    switch (type) {
        case SE_META_UINT8: case SE_META_INT8: case SE_META_BOOL: return 1;
        case SE_META_UINT16: case SE_META_INT16: return 2;
        case SE_META_UINT32: case SE_META_INT32: case SE_META_FLOAT32: return 4;
        case SE_META_UINT64: case SE_META_INT64: case SE_META_FLOAT64: return 8;
        default: return 0;  // strings and arrays have no fixed size
    }
}

static bool valid_type(uint32_t t) { return t <= SE_META_FLOAT64; }

static int read_kv(cursor * c, se_gguf_kv * kv) {
    uint32_t type;
    if (!rd_str(c, &kv->key, &kv->key_len, "truncated key")) return SE_ERR_FORMAT;
    if (kv->key_len == 0 || kv->key_len > 65535) return fail(c, "key length out of range");
    if (!rd(c, &type, 4, "truncated value type")) return SE_ERR_FORMAT;
    if (!valid_type(type)) return fail(c, "unknown value type");
    kv->type = (int32_t) type;
    kv->elem_type = (int32_t) type;
    kv->count = 1;
    if (type == SE_META_STRING) {
        const char * s;
        uint64_t n;
        kv->data = c->p;
        return rd_str(c, &s, &n, "truncated string value") ? SE_OK : SE_ERR_FORMAT;
    }
    if (type != SE_META_ARRAY) {
        kv->data = c->p;
        if (left(c) < value_size((int32_t) type)) return fail(c, "truncated value");
        c->p += value_size((int32_t) type);
        return SE_OK;
    }
    uint32_t elem;
    uint64_t count;
    if (!rd(c, &elem, 4, "truncated array type") || !rd(c, &count, 8, "truncated array length")) {
        return SE_ERR_FORMAT;
    }
    if (!valid_type(elem)) return fail(c, "unknown array element type");
    if (elem == SE_META_ARRAY) return se_error(SE_ERR_UNSUPPORTED, "%s: nested GGUF arrays are not supported", c->path);
    kv->elem_type = (int32_t) elem;
    kv->count = count;
    kv->data = c->p;
    if (elem != SE_META_STRING) {
        if (count > left(c) / value_size((int32_t) elem)) return fail(c, "array longer than the file");
        c->p += count * value_size((int32_t) elem);
        return SE_OK;
    }
    if (count > left(c) / 8) return fail(c, "string array longer than the file");
    kv->str_offsets = malloc((count ? count : 1) * sizeof(uint64_t));
    if (!kv->str_offsets) return se_error(SE_ERR_OUT_OF_MEMORY, "%s: out of memory reading metadata", c->path);
    for (uint64_t j = 0; j < count; j++) {
        const char * s;
        uint64_t n;
        kv->str_offsets[j] = (uint64_t) (c->p - kv->data);
        if (!rd_str(c, &s, &n, "truncated string in array")) return SE_ERR_FORMAT;
    }
    return SE_OK;
}

static int read_tensor_info(cursor * c, se_gguf_tensor * t, uint64_t * offset) {
    const char * name;
    uint64_t len;
    uint32_t n_dims, type;
    if (!rd_str(c, &name, &len, "truncated tensor name")) return SE_ERR_FORMAT;
    if (len == 0 || len >= SE_MAX_NAME) return fail(c, "tensor name length out of range (1..63 bytes)");
    memcpy(t->name, name, len);
    t->name[len] = 0;
    if (memchr(t->name, 0, len)) return fail(c, "tensor name contains a NUL byte");
    if (!rd(c, &n_dims, 4, "truncated tensor dimensions")) return SE_ERR_FORMAT;
    if (n_dims < 1 || n_dims > 4) return fail(c, "tensor has not 1 to 4 dimensions");
    t->n_dims = (int32_t) n_dims;
    int64_t n_values = 1;
    for (int d = 0; d < 4; d++) {
        uint64_t ne = 1;
        if (d < (int) n_dims && !rd(c, &ne, 8, "truncated tensor shape")) return SE_ERR_FORMAT;
        if (ne == 0 || ne > (uint64_t) INT64_MAX / (uint64_t) n_values) return fail(c, "tensor dimension out of range");
        t->ne[d] = (int64_t) ne;
        n_values *= (int64_t) ne;
    }
    if (!rd(c, &type, 4, "truncated tensor type")) return SE_ERR_FORMAT;
    const se_type_traits * tt = se_type_get((int32_t) type);
    if (!tt) {
        return se_error(SE_ERR_FORMAT, "%s: malformed GGUF: tensor '%s' has unknown type %u", c->path, t->name, type);
    }
    t->type = (int32_t) type;
    if (t->ne[0] % tt->block) {
        return se_error(SE_ERR_FORMAT, "%s: malformed GGUF: tensor '%s' rows of %lld values do not split into %s blocks of %d",
                        c->path, t->name, (long long) t->ne[0], tt->name, tt->block);
    }
    uint64_t blocks = (uint64_t) (n_values / tt->block);
    if (blocks > UINT64_MAX / (uint64_t) tt->size) return fail(c, "tensor size overflows");
    t->nbytes = blocks * (uint64_t) tt->size;
    return rd(c, offset, 8, "truncated tensor offset") ? SE_OK : SE_ERR_FORMAT;
}

static int by_key(const void * a, const void * b) {
    const se_gguf_kv * x = a, * y = b;
    uint64_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int r = memcmp(x->key, y->key, n);
    return r ? r : (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

static int by_name(const void * a, const void * b) {
    return strcmp(((const se_gguf_tensor *) a)->name, ((const se_gguf_tensor *) b)->name);
}

// Duplicates are found by sorting copies (an n^2 scan over a forged count would hang).
static int check_duplicates(se_gguf * g) {
    se_gguf_kv * keys = malloc((g->n_kv ? g->n_kv : 1) * sizeof(se_gguf_kv));
    se_gguf_tensor * names = malloc((g->n_tensors ? g->n_tensors : 1) * sizeof(se_gguf_tensor));
    int r = SE_OK;
    if (!keys || !names) {
        r = se_error(SE_ERR_OUT_OF_MEMORY, "%s: out of memory", g->path);
        goto done;
    }
    memcpy(keys, g->kv, (size_t) g->n_kv * sizeof(se_gguf_kv));
    qsort(keys, (size_t) g->n_kv, sizeof(se_gguf_kv), by_key);
    for (int64_t i = 1; i < g->n_kv && r == SE_OK; i++) {
        if (by_key(&keys[i - 1], &keys[i]) == 0) {
            r = se_error(SE_ERR_FORMAT, "%s: malformed GGUF: duplicate key '%.*s'", g->path, (int) keys[i].key_len, keys[i].key);
        }
    }
    memcpy(names, g->tensors, (size_t) g->n_tensors * sizeof(se_gguf_tensor));
    qsort(names, (size_t) g->n_tensors, sizeof(se_gguf_tensor), by_name);
    for (int64_t i = 1; i < g->n_tensors && r == SE_OK; i++) {
        if (strcmp(names[i - 1].name, names[i].name) == 0) {
            r = se_error(SE_ERR_FORMAT, "%s: malformed GGUF: duplicate tensor '%s'", g->path, names[i].name);
        }
    }
done:
    free(keys);
    free(names);
    return r;
}

static int parse(se_gguf * g) {
    cursor c = {g->map, g->map, g->map + g->size, g->path};
    uint32_t magic;
    uint64_t n_tensors, n_kv;
    if (!rd(&c, &magic, 4, "file too short")) return SE_ERR_FORMAT;
    if (magic != GGUF_MAGIC) return se_error(SE_ERR_FORMAT, "%s: not a GGUF file (bad magic)", g->path);
    if (!rd(&c, &g->version, 4, "file too short")) return SE_ERR_FORMAT;
    if (g->version < 2 || g->version > 3) {
        return se_error(SE_ERR_UNSUPPORTED, "%s: GGUF version %u is not supported (2 or 3)", g->path, g->version);
    }
    if (!rd(&c, &n_tensors, 8, "file too short") || !rd(&c, &n_kv, 8, "file too short")) {
        return SE_ERR_FORMAT;
    }
    // every KV pair takes at least 13 bytes, every tensor info at least 32
    if (n_kv > left(&c) / 13) return fail(&c, "KV count larger than the file can hold");
    if (n_tensors > left(&c) / 32) return fail(&c, "tensor count larger than the file can hold");
    g->n_kv = (int64_t) n_kv;
    g->kv = calloc(n_kv ? n_kv : 1, sizeof(se_gguf_kv));
    g->n_tensors = (int64_t) n_tensors;
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(se_gguf_tensor));
    uint64_t * offsets = calloc(n_tensors ? n_tensors : 1, sizeof(uint64_t));
    if (!g->kv || !g->tensors || !offsets) {
        free(offsets);
        return se_error(SE_ERR_OUT_OF_MEMORY, "%s: out of memory", g->path);
    }
    int r = SE_OK;
    for (uint64_t i = 0; i < n_kv && r == SE_OK; i++) r = read_kv(&c, &g->kv[i]);
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ia = r == SE_OK ? se_gguf_find(g, "general.alignment") : -1;
    if (ia >= 0) {
        const se_gguf_kv * kv = &g->kv[ia];
        uint32_t a = 0;
        if (kv->type == SE_META_UINT32) memcpy(&a, kv->data, 4);
        // quant blocks are read in place, so their fields must be naturally aligned: llama.cpp's
        // loader also requires a power of two, and 8 covers every field of every block type
        if (a < 8 || (a & (a - 1)) || a > (1u << 20)) {
            r = se_error(SE_ERR_FORMAT, "%s: malformed GGUF: general.alignment must be a uint32 power of two in [8, 2^20], got %u",
                         g->path, a);
        } else {
            g->alignment = a;
        }
    }
    for (uint64_t i = 0; i < n_tensors && r == SE_OK; i++) r = read_tensor_info(&c, &g->tensors[i], &offsets[i]);
    if (r == SE_OK) r = check_duplicates(g);
    if (r == SE_OK) {
        uint64_t data_start = (uint64_t) (c.p - c.base);
        data_start += (g->alignment - data_start % g->alignment) % g->alignment;
        for (uint64_t i = 0; i < n_tensors && r == SE_OK; i++) {
            se_gguf_tensor * t = &g->tensors[i];
            if (offsets[i] % g->alignment) {
                r = se_error(SE_ERR_FORMAT, "%s: malformed GGUF: tensor '%s' data is not aligned to %u bytes",
                             g->path, t->name, g->alignment);
            } else if (data_start > g->size || offsets[i] > g->size - data_start ||
                       t->nbytes > g->size - data_start - offsets[i]) {
                r = se_error(SE_ERR_FORMAT, "%s: malformed GGUF: tensor '%s' data lies past the end of the file",
                             g->path, t->name);
            } else {
                t->data = g->map + data_start + offsets[i];
            }
        }
    }
    free(offsets);
    return r;
}

int se_gguf_open(const char * path, se_gguf * g) {
    memset(g, 0, sizeof *g);
    g->path = strdup(path);
    if (!g->path) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    // O_NONBLOCK: opening a FIFO (or a device) for reading would otherwise block until a writer
    // appears; such files are then refused by the regular-file check below
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int r = se_error(SE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        se_gguf_close(g);
        return r;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        int r = se_error(SE_ERR_IO, "%s: not a regular file", path);
        se_gguf_close(g);
        return r;
    }
    if (st.st_size == 0) {
        close(fd);
        int r = se_error(SE_ERR_FORMAT, "%s: not a GGUF file (empty)", path);
        se_gguf_close(g);
        return r;
    }
    void * map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd);
    if (map == MAP_FAILED) {
        int r = se_error(SE_ERR_IO, "%s: cannot map: %s", path, strerror(err));
        se_gguf_close(g);
        return r;
    }
    g->map = map;
    g->size = (uint64_t) st.st_size;
    int r = parse(g);
    if (r != SE_OK) se_gguf_close(g);
    return r;
}

void se_gguf_close(se_gguf * g) {
    if (g->kv) {
        for (int64_t i = 0; i < g->n_kv; i++) free(g->kv[i].str_offsets);
    }
    free(g->kv);
    free(g->tensors);
    if (g->map) munmap(g->map, g->size);
    free(g->path);
    memset(g, 0, sizeof *g);
}

int64_t se_gguf_find(const se_gguf * g, const char * key) {
    size_t n = strlen(key);
    for (int64_t i = 0; i < g->n_kv; i++) {
        if (g->kv[i].key && g->kv[i].key_len == n && memcmp(g->kv[i].key, key, n) == 0) return i;
    }
    return -1;
}

const se_gguf_tensor * se_gguf_find_tensor(const se_gguf * g, const char * name) {
    for (int64_t i = 0; i < g->n_tensors; i++) {
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    }
    return NULL;
}

static int elem_of(const se_gguf * g, int64_t i, uint64_t elem, const uint8_t ** p, int32_t * type) {
    if (i < 0 || i >= g->n_kv) return se_error(SE_ERR_INVALID_ARGUMENT, "metadata index %lld out of range", (long long) i);
    const se_gguf_kv * kv = &g->kv[i];
    if (elem >= kv->count) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "%s: element %llu of '%.*s' out of range (%llu elements)", g->path,
                        (unsigned long long) elem, (int) kv->key_len, kv->key, (unsigned long long) kv->count);
    }
    *type = kv->elem_type;
    *p = kv->type == SE_META_ARRAY && kv->elem_type != SE_META_STRING
             ? kv->data + elem * value_size(kv->elem_type)
             : kv->data + (kv->str_offsets ? kv->str_offsets[elem] : 0);
    return SE_OK;
}

static int wrong_type(const se_gguf * g, int64_t i, const char * want) {
    return se_error(SE_ERR_FORMAT, "%s: key '%.*s' is not %s", g->path, (int) g->kv[i].key_len, g->kv[i].key, want);
}

int se_gguf_int(const se_gguf * g, int64_t i, uint64_t elem, int64_t * out) {
    const uint8_t * p = NULL;
    int32_t type = -1;
    int r = elem_of(g, i, elem, &p, &type);
    if (r != SE_OK) return r;
    switch (type) {
        case SE_META_UINT8:  { uint8_t v;  memcpy(&v, p, 1); *out = v; return SE_OK; }
        case SE_META_INT8:   { int8_t v;   memcpy(&v, p, 1); *out = v; return SE_OK; }
        case SE_META_BOOL:   { uint8_t v;  memcpy(&v, p, 1); *out = v != 0; return SE_OK; }
        case SE_META_UINT16: { uint16_t v; memcpy(&v, p, 2); *out = v; return SE_OK; }
        case SE_META_INT16:  { int16_t v;  memcpy(&v, p, 2); *out = v; return SE_OK; }
        case SE_META_UINT32: { uint32_t v; memcpy(&v, p, 4); *out = v; return SE_OK; }
        case SE_META_INT32:  { int32_t v;  memcpy(&v, p, 4); *out = v; return SE_OK; }
        case SE_META_INT64:  { int64_t v;  memcpy(&v, p, 8); *out = v; return SE_OK; }
        case SE_META_UINT64: {
            uint64_t v;
            memcpy(&v, p, 8);
            if (v > (uint64_t) INT64_MAX) return wrong_type(g, i, "an integer in range");
            *out = (int64_t) v;
            return SE_OK;
        }
        default: return wrong_type(g, i, "an integer");
    }
}

int se_gguf_float(const se_gguf * g, int64_t i, uint64_t elem, double * out) {
    const uint8_t * p = NULL;
    int32_t type = -1;
    int r = elem_of(g, i, elem, &p, &type);
    if (r != SE_OK) return r;
    if (type == SE_META_FLOAT32) {
        float v;
        memcpy(&v, p, 4);
        *out = v;
        return SE_OK;
    }
    if (type == SE_META_FLOAT64) {
        memcpy(out, p, 8);
        return SE_OK;
    }
    int64_t v;
    if (type == SE_META_STRING || se_gguf_int(g, i, elem, &v) != SE_OK) return wrong_type(g, i, "a number");
    *out = (double) v;
    return SE_OK;
}

int se_gguf_string(const se_gguf * g, int64_t i, uint64_t elem, const char ** s, uint64_t * len) {
    const uint8_t * p = NULL;
    int32_t type = -1;
    int r = elem_of(g, i, elem, &p, &type);
    if (r != SE_OK) return r;
    if (type != SE_META_STRING) return wrong_type(g, i, "a string");
    memcpy(len, p, 8);  // validated by the parser
    *s = (const char *) p + 8;
    return SE_OK;
}
