"""The generated modules in gatewayd/v1 are exactly what `make proto` makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2

ROOT = Path(__file__).parent.parent


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
                    f"--pyi_out={out}", f"--grpc_python_out={out}", *protos], check=True, cwd=ROOT / "proto")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / "gatewayd" / "v1").glob("*_pb2*")}
    assert fresh.keys() == committed.keys()
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"run `make proto`: stale {stale}"


def test_every_field_and_method_is_documented() -> None:
    for module in (types_pb2, control_pb2, challenge_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        source = (ROOT / "proto" / module.DESCRIPTOR.name).read_text()
        for message in proto.message_type:
            for field in message.field:
                line = next(i for i, text in enumerate(source.splitlines())
                            if f" {field.name} = {field.number};" in text)
                before = source.splitlines()[line - 1].strip()
                assert before.startswith("//"), f"{message.name}.{field.name} is not documented"
        for service in proto.service:
            for method in service.method:
                line = next(i for i, text in enumerate(source.splitlines()) if f"rpc {method.name}(" in text)
                assert source.splitlines()[line - 1].strip().startswith("//"), f"{method.name} undocumented"
