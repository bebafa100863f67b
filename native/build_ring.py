"""cffi (API, out-of-line) build of the native SPSC ring: ``livelm.native._ring``.

setup.py picks up ``ffibuilder`` through ``cffi_modules``. For debugging, run
``python native/build_ring.py`` to compile the extension next to this file.
"""

import importlib.machinery
import os
import shutil
import sys
import tempfile

import cffi

MODULE_NAME = "livelm.native._ring"

CDEF = """
typedef struct lr_ring lr_ring;

lr_ring *lr_ring_create(uint64_t capacity_words);
void lr_ring_destroy(lr_ring *r);
int lr_ring_write(lr_ring *r, const uint32_t *src, uint64_t n);
uint64_t lr_ring_read(lr_ring *r, uint32_t *dst, uint64_t max_words);
uint64_t lr_ring_peek(lr_ring *r, uint32_t *dst, uint64_t n);
void lr_ring_consume(lr_ring *r, uint64_t n);
uint64_t lr_ring_used(lr_ring *r);
uint64_t lr_ring_free(lr_ring *r);
uint64_t lr_ring_capacity(lr_ring *r);
int lr_ring_wait(lr_ring *r, int64_t timeout_us);
void lr_ring_wake(lr_ring *r);
"""

# cffi's setuptools hook execs this file with __file__ relative to the repository root
# (setup.py's directory, which is also the working directory).
NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))


def make_builder(native_dir: str) -> cffi.FFI:
    """An FFI builder whose C source and include paths are rooted at ``native_dir``."""
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE_NAME,
        '#include "ring.h"',
        sources=[os.path.join(native_dir, "ring.c")],
        include_dirs=[native_dir],
        extra_compile_args=["-O2", "-std=c11"],
        libraries=["pthread"],
    )
    return ffi


# setuptools expects paths relative to setup.py's directory (they are also what sdist
# records); fall back to absolute ones when this file is exec'd from elsewhere.
_rel = os.path.relpath(NATIVE_DIR)
ffibuilder = make_builder(NATIVE_DIR if _rel.startswith("..") else _rel)


def compile_in_place() -> str:
    """Compile the extension and copy it next to this file; returns the path of the copy."""
    # ffi.compile() chdirs into its tmpdir, so this builder needs absolute paths.
    with tempfile.TemporaryDirectory() as tmp:
        built = make_builder(NATIVE_DIR).compile(tmpdir=tmp, verbose=True)
        # cffi builds with the limited API, so take the name setuptools gives the module:
        # this copy and `pip install -e .` then replace each other, neither shadows the other.
        name = os.path.basename(built)
        if ".abi3.so" in importlib.machinery.EXTENSION_SUFFIXES:
            name = "_ring.abi3.so"
        target = os.path.join(NATIVE_DIR, name)
        shutil.copyfile(built, target)
    return target


if __name__ == "__main__":
    print(compile_in_place(), file=sys.stderr)
