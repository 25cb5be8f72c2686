"""The store and its artifacts, run against both backends: a local directory
and a real S3 server (SeaweedFS on loopback, with authentication)."""

from __future__ import annotations

import hashlib
import os

import pytest

from vidalign.errors import InvalidInput, NotFound, Unauthenticated, Unavailable
from vidalign.store import (
    ArtifactCorrupted,
    commit_artifact,
    fetch_artifact,
    latest_artifact,
    list_artifacts,
    open_store,
    prune_artifacts,
    read_artifact_file,
    read_manifest,
)
from vidalign.store.s3 import PART_SIZE

from ..conftest import S3_BUCKET


def test_objects_round_trip(store_uri, tmp_path):
    store = open_store(store_uri)
    store.put_bytes("a/b.txt", b"hello")
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3000))
    store.put_file("a/c/d.bin", source)
    assert store.get_bytes("a/b.txt") == b"hello"
    store.get_file("a/c/d.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert store.exists("a/b.txt") and not store.exists("a/nope")
    assert store.size("a/c/d.bin") == 3000
    assert store.list() == ["a/b.txt", "a/c/d.bin"]
    assert store.list("a/c") == ["a/c/d.bin"]
    assert store.child("a").list() == ["b.txt", "c/d.bin"]
    assert store.read_range("a/c/d.bin", 100, 50) == source.read_bytes()[100:150]
    with pytest.raises(NotFound, match="a/missing does not exist"):
        store.get_bytes("a/missing")
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting twice is fine
    store.delete_prefix("a")
    assert store.list() == []


def test_large_file_streams_in_parts_and_ranges(store_uri, tmp_path):
    store = open_store(store_uri)
    big = tmp_path / "big.bin"
    size = PART_SIZE + 5_000_123  # more than one multipart part
    with open(big, "wb") as f:
        for _ in range(size // (1 << 20) + 1):
            f.write(os.urandom(1 << 20))
        f.truncate(size)
    store.put_file("big.bin", big)
    assert store.size("big.bin") == size
    whole = big.read_bytes()
    assert store.sha256("big.bin") == hashlib.sha256(whole).hexdigest()  # via ranged reads
    assert store.read_range("big.bin", PART_SIZE - 10, 20) == whole[PART_SIZE - 10 : PART_SIZE + 10]


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", ""])
def test_keys_cannot_escape_the_root(store_uri, key):
    with pytest.raises(InvalidInput, match="store key"):
        open_store(store_uri).put_bytes(key, b"x")


def test_symlinks_out_of_a_local_store_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("ok", b"1")
    (tmp_path / "store" / "link").symlink_to(outside)
    with pytest.raises(InvalidInput, match="outside the store root"):
        store.get_bytes("link/secret")


def test_artifacts_commit_list_latest_prune(store_uri, tmp_path):
    store = open_store(store_uri)
    for step in (10, 20, 30):
        commit_artifact(store, f"ckpt/step-{step}", {"w.bin": f"w{step}".encode()},
                        producer="test", config_digest="sha256:abc", step=step)
    # Files without a manifest do not make an artifact.
    store.put_bytes("ckpt/step-40/w.bin", b"half-written")
    assert list_artifacts(store, "ckpt") == ["ckpt/step-10", "ckpt/step-20", "ckpt/step-30"]
    assert latest_artifact(store, "ckpt") == "ckpt/step-30"
    manifest = read_manifest(store, "ckpt/step-20")
    assert manifest.step == 20 and manifest.producer == "test"
    assert manifest.files == {"w.bin": {"size": 3, "sha256": hashlib.sha256(b"w20").hexdigest()}}
    assert read_artifact_file(store, "ckpt/step-20", "w.bin") == b"w20"
    fetch_artifact(store, "ckpt/step-20", tmp_path / "f")
    assert (tmp_path / "f" / "w.bin").read_bytes() == b"w20"
    assert prune_artifacts(store, "ckpt", keep_latest_k=2) == ["ckpt/step-10"]
    assert list_artifacts(store, "ckpt") == ["ckpt/step-20", "ckpt/step-30"]
    assert not store.list("ckpt/step-10")
    assert read_manifest(store, "ckpt/step-40") is None
    with pytest.raises(NotFound, match="not committed"):
        read_artifact_file(store, "ckpt/step-40", "w.bin")


def test_corruption_after_commit_is_detected(store_uri, tmp_path):
    store = open_store(store_uri)
    commit_artifact(store, "art", {"a.bin": b"aaaa", "b.bin": b"bbbb"}, producer="test")
    store.put_bytes("art/b.bin", b"bbbX")  # bit rot, or someone overwrote it
    assert read_artifact_file(store, "art", "a.bin") == b"aaaa"
    with pytest.raises(ArtifactCorrupted, match=r"'b\.bin' does not match its manifest"):
        read_artifact_file(store, "art", "b.bin")
    with pytest.raises(ArtifactCorrupted, match=r"'b\.bin'"):
        fetch_artifact(store, "art", tmp_path / "dest")


def test_object_readable_by_boto3_with_matching_sha(s3_server, s3_uri):
    import boto3

    store = open_store(s3_uri)
    payload = os.urandom(100_000)
    manifest = commit_artifact(store, "art", {"data.bin": payload}, producer="test")
    env = s3_server.env()
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )
    key = s3_uri.removeprefix(f"s3://{S3_BUCKET}/") + "/art/data.bin"
    body = client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == manifest.files["data.bin"]["sha256"]


def test_server_stopped_mid_commit_leaves_nothing_then_commit_succeeds(s3_server, s3_uri, tmp_path):
    store = open_store(s3_uri)
    files = {}
    for name in ("a.bin", "b.bin", "c.bin"):
        files[name] = tmp_path / name
        files[name].write_bytes(os.urandom(200_000))
    real_put = type(store).put_file
    calls = []

    def put_then_die(self, key, path):
        real_put(self, key, path)
        calls.append(key)
        if len(calls) == 1:
            s3_server.stop()  # the server dies after the first data file

    type(store).put_file = put_then_die
    try:
        with pytest.raises(Unavailable, match="cannot reach S3"):
            commit_artifact(store, "multi", files, producer="test")
    finally:
        type(store).put_file = real_put
        s3_server.start()
    assert calls == ["multi/a.bin"]
    assert list_artifacts(store) == [] and read_manifest(store, "multi") is None
    commit_artifact(store, "multi", files, producer="test")
    assert list_artifacts(store) == ["multi"]
    fetch_artifact(store, "multi", tmp_path / "back")
    assert all((tmp_path / "back" / n).read_bytes() == p.read_bytes() for n, p in files.items())


def test_wrong_credentials_and_missing_bucket(s3_server, monkeypatch):
    env = s3_server.env(secret_key="definitely-wrong-secret")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Unauthenticated, match="rejected the credentials") as err:
        open_store(f"s3://{S3_BUCKET}/x").put_bytes("k", b"v")
    assert "definitely-wrong-secret" not in str(err.value)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(NotFound, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").get_bytes("k")


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("VIDALIGN_S3_RETRIES", "0")
    with pytest.raises(Unavailable, match=r"cannot reach S3 at http://127.0.0.1:9"):
        open_store("s3://bucket/x").get_bytes("k")


def test_uri_forms(tmp_path):
    assert open_store(f"file://{tmp_path}").uri == str(tmp_path)
    assert open_store(str(tmp_path / "x")).uri == str(tmp_path / "x")
    with pytest.raises(InvalidInput, match="unsupported store scheme"):
        open_store("gs://bucket/x")
