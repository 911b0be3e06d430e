"""Types of the compiled module ``_spawn.c`` (optional: it may not be built)."""

def spawn(
    path: bytes,
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes | None,
    stdin_fd: int,
    stdout_fd: int,
    parent: int,
) -> int: ...
