"""Run by `cargo xtask nested-test` (xtask/src/l1python.rs) with the Python that is packed into
L1, the venv's interpreter (target/python-venv/bin/python): writes the pruned standard library
as OUT/pythonXY.zip (compiled modules only, stored uncompressed: the initramfs is gzipped, and
zipimport then needs no zlib) and prints a JSON manifest of the files to pack next to it:
the interpreter, the lib-dynload extension modules and the installed `capsule` package.

usage: python pack_python.py OUT
"""

import importlib.util
import json
import marshal
import os
import struct
import sys
import sysconfig
import zipfile

# Top-level parts of the standard library left out: tests, GUIs, installers, tools and
# modules nothing in L1 uses. Everything else is packed.
EXCLUDE = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "venv",
    "lib2to3",
    "distutils",
    "pydoc_data",
    "site-packages",
    "lib-dynload",
    "__pycache__",
    "__phello__",
}
# Extension modules left out: tests, GUIs and terminals, databases, and the modules that
# need large libraries (OpenSSL for _ssl and _hashlib; hashlib then uses its built-in
# implementations).
EXCLUDE_DYNLOAD_PREFIXES = (
    "_test",
    "_ctypes_test",
    "xxlimited",
    "_xx",
    "_tkinter",
    "_curses",
    "readline",
    "_dbm",
    "_gdbm",
    "_sqlite3",
    "_ssl",
    "_hashlib",
    "nis",
    "ossaudiodev",
    "spwd",
    "_crypt",
    "audioop",
)


def pyc(path, zip_name):
    """A .pyc for the module at path: the installation's cached one when it is valid for the
    source (timestamp-based, same magic), else freshly compiled."""
    st = os.stat(path)
    cached = importlib.util.cache_from_source(path)
    try:
        with open(cached, "rb") as f:
            data = f.read()
        magic, flags, mtime, size = data[:4], *struct.unpack("<3I", data[4:16])
        if (
            magic == importlib.util.MAGIC_NUMBER
            and flags == 0
            and mtime == int(st.st_mtime) & 0xFFFFFFFF
            and size == st.st_size & 0xFFFFFFFF
        ):
            return data
    except (OSError, ValueError, struct.error):
        pass
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, zip_name, "exec", dont_inherit=True)
    header = struct.pack(
        "<3I", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF
    )
    return importlib.util.MAGIC_NUMBER + header + marshal.dumps(code)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    stdlib = sysconfig.get_path("stdlib")  # the base installation's, also in a venv
    dynload = os.path.join(stdlib, "lib-dynload")
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    zip_path = os.path.join(out, f"python{tag}.zip")
    modules = 0
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for root, dirs, files in os.walk(stdlib):
            rel_root = os.path.relpath(root, stdlib)
            if rel_root == ".":
                dirs[:] = sorted(d for d in dirs if d not in EXCLUDE)
            else:
                dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "test", "tests"))
            for name in sorted(files):
                if not name.endswith(".py") or (rel_root == "." and name in EXCLUDE):
                    continue
                rel = os.path.normpath(os.path.join(rel_root, name))
                arc = rel[:-3] + ".pyc"
                zf.writestr(arc, pyc(os.path.join(root, name), rel))
                modules += 1
    extensions = sorted(
        os.path.join(dynload, n)
        for n in os.listdir(dynload)
        if n.endswith(".so") and not n.startswith(EXCLUDE_DYNLOAD_PREFIXES)
    )
    spec = importlib.util.find_spec("capsule")
    package = list(spec.submodule_search_locations)[0] if spec else None
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    json.dump(
        {
            "version": f"{sys.version_info.major}.{sys.version_info.minor}",
            "full_version": sys.version.split()[0],
            "executable": executable,
            "zip": zip_path,
            "zip_modules": modules,
            "lib_dynload": extensions,
            "capsule_package": package,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
