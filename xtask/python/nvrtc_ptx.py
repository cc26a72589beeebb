"""CUDA C++ → PTX with NVRTC, for `cargo xtask cuda-report` (no GPU or driver needed).

usage: nvrtc_ptx.py LIBNVRTC ARCH JOBS INCLUDE_DIR... -- FILE.cu...

Writes FILE.ptx next to each FILE.cu, with the options cubecl-cuda 0.10 passes to NVRTC
(`--gpu-architecture=ARCH`, the include paths, `-lineinfo`). Prints one JSON object per line:
{"file": ..., "ok": true|false, "log": "..."} (the NVRTC log, the compile error on failure).
"""

import ctypes
import json
import sys
from concurrent.futures import ProcessPoolExecutor

_lib = None


def _nvrtc(path):
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(path)
    return _lib


def _check(lib, code, what):
    if code != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(code).decode()}")


def compile_one(args):
    lib_path, arch, includes, cu = args
    lib = _nvrtc(lib_path)
    with open(cu, "rb") as f:
        source = f.read()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source, None, 0, None, None), "nvrtcCreateProgram")
    options = [f"--gpu-architecture={arch}".encode(), b"-lineinfo"]
    options += [f"--include-path={d}".encode() for d in includes]
    argv = (ctypes.c_char_p * len(options))(*options)
    code = lib.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    log_text = log.value.decode(errors="replace")
    ok = code == 0
    if ok:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        with open(cu[: -len(".cu")] + ".ptx", "wb") as f:
            f.write(ptx.value)
    else:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        log_text = lib.nvrtcGetErrorString(code).decode() + "\n" + log_text
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return {"file": cu, "ok": ok, "log": log_text}


def main(argv):
    if "--" not in argv or len(argv) < 4:
        sys.exit(__doc__)
    split = argv.index("--")
    lib_path, arch, jobs, includes = argv[0], argv[1], int(argv[2]), argv[3:split]
    files = argv[split + 1 :]
    try:
        _nvrtc(lib_path)
    except OSError as e:
        sys.exit(f"cannot load NVRTC from {lib_path}: {e}")
    work = [(lib_path, arch, includes, f) for f in files]
    # NVRTC is single-threaded per program; processes, not threads, so one slow kernel (the
    # cubek-matmul ones take seconds) does not hold the others.
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for result in pool.map(compile_one, work):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
