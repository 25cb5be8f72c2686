"""The committed generated code matches protos/ (run `make protos` after editing a .proto)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT, check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    stale = [str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (ROOT / "libs" / rel).read_bytes()]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_every_proto_element_has_a_leading_comment():
    # buf STANDARD lint style: services, rpcs, messages and fields are documented.
    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = stripped.startswith(("service ", "rpc ", "message ")) or (
                "=" in stripped and stripped.endswith(";") and not stripped.startswith(("syntax", "package", "//"))
            )
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment: {stripped}"
