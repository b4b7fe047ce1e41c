"""Build the relay engine (C sources in csrc/ behind a Cython binding, edgegw._relay) and the
node's compiled chacha20-poly1305 on the system's libcrypto (internal.ssh._aead: optional, the
node falls back to reaching libcrypto through cffi where it cannot be built)."""
import glob
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - Cython is a build requirement
    # Only a build without isolation gets here (pip installs pyproject's build requirements
    # otherwise): stop, rather than make a wheel without the relay engine.
    sys.exit("building edgegw needs Cython >= 3.0 (a build requirement in pyproject.toml): "
             "install it, or build without --no-build-isolation")

CSRC = ["csrc/engine.c", "csrc/splice_backend.c", "csrc/poll_backend.c", "csrc/pipe_pool.c"]

ext = Extension(
    "edgegw._relay",
    sources=["edgegw/_relay.pyx", *CSRC],
    include_dirs=["csrc"],
    depends=glob.glob("csrc/*.h"),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    libraries=["pthread"] if sys.platform != "win32" else [],
)
aead = Extension(
    "internal.ssh._aead",
    sources=["internal/ssh/_aead.pyx"],
    extra_compile_args=["-O2", "-Wall"],
    libraries=["crypto"],   # OpenSSL 3 (Debian: libssl-dev to build, libssl3 to run)
    optional=True,
)
ext_modules = cythonize([ext, aead], language_level=3,
                        compiler_directives={"embedsignature": True})

setup(ext_modules=ext_modules)
