"""The data commands as a user runs them: `trainguard keygen | sign | cosign | verify` (exit 0 / 1 / 2). They run in
this process (`cli`), except where a test needs a process of their own: the first bad input of `sign` and of `cosign`,
a terminal, and verify's hashing ahead in forked children (only a single-threaded process forks, and a test worker has
threads)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
Run = Callable[..., subprocess.CompletedProcess[str]]


def process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`trainguard *args` started as its own process, by the console script."""
    done = subprocess.run([TRAINGUARD, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def run(cli: Run, tmp_path: Path) -> Run:
    """`run(*args, env=None)`: `trainguard *args` in this process (`cli`), in the test's folder, `env` set for it."""

    def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = cli(tmp_path, *args, env=env)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    return run


def test_keygen_sign_cosign_verify_round_trip(data_dir: Path, tmp_path: Path, run: Run) -> None:
    keys = tmp_path / "keys"
    done = run("keygen", "--out", keys / "owner", env={"TRAINGUARD_KEY_PASSPHRASE": "pw"})
    assert done.returncode == 0, done.stderr
    private = (keys / "owner.key").read_bytes()
    assert b"ENCRYPTED" in private and stat.S_IMODE((keys / "owner.key").stat().st_mode) == 0o600
    assert run("keygen", "--out", keys / "second", "--type", "ecdsa-p256").returncode == 0
    assert private.decode().splitlines()[1] not in done.stdout + done.stderr
    (keys / "policy.json").write_text(
        json.dumps({"threshold": 2, "keys": ["owner.pub", "second.pub"], "roles": ["train", "holdout"]})
    )

    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"alice/*": "alice", "bob/": "bob"}))
    manifest = tmp_path / "digits.manifest.json"
    signed = run(
        "sign",
        data_dir,
        "--key",
        keys / "owner.key",
        "--out",
        manifest,
        "--sources",
        sources,
        "--source",
        "curator",
        "--roles",
        '{"holdout.parquet": "holdout"}',
        "--expires",
        "2d",
        env={"TRAINGUARD_KEY_PASSPHRASE": "pw"},
    )
    assert signed.returncode == 0, signed.stderr
    assert "signed 5 shards" in signed.stdout and "version 1" in signed.stdout

    below = run("verify", manifest, "--trust", keys / "policy.json", "--data-dir", data_dir)
    assert below.returncode == 1
    assert "manifest: below-threshold" in below.stderr
    assert below.stderr.strip().splitlines()[-1].startswith("trainguard: error: ")

    assert run("cosign", manifest, "--key", keys / "second.key").returncode == 0
    report = run("verify", manifest, "--trust", keys / "policy.json", "--data-dir", data_dir, "--json")
    assert report.returncode == 0, report.stderr
    document = json.loads(report.stdout)
    assert document["ok"] and document["shards"] == 5 and len(document["signers"]) == 2
    assert report.stderr == ""

    other = run("verify", manifest, "--trust", keys / "policy.json", "--data-dir", data_dir, "--dataset", "other")
    assert other.returncode == 1 and "manifest: wrong-dataset" in other.stderr
    named = run("verify", manifest, "--trust", keys / "policy.json", "--data-dir", data_dir, "--dataset", "data")
    assert named.returncode == 0, named.stderr


def test_tampered_data_exits_1_listing_every_failing_shard(data_dir: Path, tmp_path: Path, run: Run) -> None:
    run("keygen", "--out", tmp_path / "k")
    manifest = tmp_path / "m.json"
    assert run("sign", data_dir, "--key", tmp_path / "k.key", "--out", manifest, "--source", "alice").returncode == 0
    (data_dir / "raw.bin").write_bytes(b"tampered")
    (data_dir / "bob" / "shard-00.parquet").unlink()
    done = run("verify", manifest, "--trust", tmp_path / "k.pub", "--data-dir", data_dir)
    assert done.returncode == 1
    assert "FAIL raw.bin: truncated" in done.stderr
    assert "FAIL bob/shard-00.parquet: missing" in done.stderr
    as_json = run("verify", manifest, "--trust", tmp_path / "k.pub", "--data-dir", data_dir, "--json")
    assert as_json.returncode == 1
    failures = {f["shard"]: f["reason"] for f in json.loads(as_json.stdout)["failures"]}
    assert failures == {"raw.bin": "truncated", "bob/shard-00.parquet": "missing"}


def test_unusable_input_exits_2_with_one_line(tmp_path: Path, manifest: Path, key_pairs, run: Run) -> None:
    """The first case of `sign` and of `cosign` starts the `trainguard` console script as its own process (`verify`
    starts as one in the hashing-ahead tests below); the others run in this one."""
    (tmp_path / "garbage.json").write_text("{not json")
    cases = [
        ("verify", tmp_path / "garbage.json", "--trust", key_pairs.trust("alice")),
        ("verify", manifest, "--trust", tmp_path / "missing.pub"),
        ("verify", tmp_path / "missing.json", "--trust", key_pairs.trust("alice")),
        ("sign", tmp_path / "no-such-dir", "--key", key_pairs.private("alice"), "--out", tmp_path / "m.json"),
        (
            "sign",
            manifest.parent,
            "--key",
            key_pairs.private("alice"),
            "--out",
            tmp_path / "m.json",
            "--source",
            "a",
            "--expires",
            "yesterday",
        ),
        ("cosign", tmp_path / "garbage.json", "--key", key_pairs.private("bob")),
    ]
    own_process = {"sign", "cosign"}
    for args in cases:
        done = process(*args) if args[0] in own_process else run(*args)
        own_process.discard(args[0])
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trainguard: error: "), (args, done.stderr)


def test_verify_command_does_not_import_torch(manifest: Path, key_pairs) -> None:
    code = (
        "import sys; from trainguard.pipeline.cli import main;"
        "code = main(['verify', sys.argv[1], '--trust', sys.argv[2]]);"
        "print('torch' in sys.modules, code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(manifest), str(key_pairs.trust("alice"))], capture_output=True, text=True
    )
    assert done.stdout.split()[-2:] == ["False", "0"], done.stderr


def test_progress_bar_only_on_a_terminal_and_never_with_json(manifest: Path, key_pairs) -> None:
    import pty

    def stderr_on_tty(*extra: str) -> bytes:
        master, slave = pty.openpty()
        args = [TRAINGUARD, "verify", str(manifest), "--trust", str(key_pairs.trust("alice")), *extra]
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=slave, timeout=120)
        os.close(slave)
        chunks = []
        try:
            while chunk := os.read(master, 65536):
                chunks.append(chunk)
        except OSError:
            pass
        os.close(master)
        assert done.returncode == 0
        return b"".join(chunks)

    assert b"verifying" in stderr_on_tty()
    assert stderr_on_tty("--json") == b""


def test_importing_provenance_does_not_import_torch() -> None:
    code = (
        "import sys; from trainguard import provenance; provenance.verify_dataset;"
        "print('torch' in sys.modules, 'pandas' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_file_name_with_a_newline_cannot_forge_a_verify_output_line(manifest: Path, key_pairs, run: Run) -> None:
    (manifest.parent / "x.bin\nOK dataset 'digits' version 1: all shards verified").write_bytes(b"x")
    with open(os.path.join(os.fsencode(manifest.parent), b"bad\xff\x1b[2J.bin"), "wb") as stream:
        stream.write(b"x")
    done = run("verify", manifest, "--trust", key_pairs.trust("alice"), "--state", manifest.parent.parent / "s.json")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    forged = "FAIL x.bin\\nOK dataset 'digits' version 1"
    assert [line.split(":")[0] for line in lines[:-1]] == ["FAIL bad\\udcff\\x1b[2J.bin", forged]
    assert lines[-1].startswith("trainguard: error:") and not done.stdout


def test_verify_names_the_folder_it_searched_and_keeps_rollback_records_in_the_project(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run, cli: Run
) -> None:
    """A manifest written outside its data folder: the misses name the folder searched; `--data` finds the shards;
    without $TRAINGUARD_HOME the anti-rollback records land in the project's `.trainguard/`, not the user's home."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.delenv("TRAINGUARD_HOME")
    assert run("keygen", "--out", project / "keys" / "owner").returncode == 0
    manifest = project / "manifests" / "data.manifest.json"
    signed = run("sign", data_dir, "--key", project / "keys" / "owner.key", "--out", manifest, "--source", "me")
    assert signed.returncode == 0, signed.stderr
    trust = project / "keys" / "owner.pub"
    missed = cli(project, "verify", manifest, "--trust", trust)
    assert missed.returncode == 1 and f"looked for under {manifest.parent}" in missed.stderr, missed.stderr
    found = cli(project, "verify", manifest, "--trust", trust, "--data", data_dir)
    assert found.returncode == 0, found.stderr
    assert (project / ".trainguard" / "provenance-state.json").is_file()
    gone = run("verify", project / "nope.json", "--trust", trust)
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1


def test_verify_hashing_ahead_refuses_a_changed_byte_and_names_swapped_shards(manifest: Path, key_pairs) -> None:
    """As its own process: verify hashes small files ahead in forked children only in a single-threaded process, which
    a test worker is not."""
    raw = manifest.parent / "raw.bin"
    raw.write_bytes(bytes([raw.read_bytes()[0] ^ 1]) + raw.read_bytes()[1:])
    a, b = manifest.parent / "alice" / "shard-00.parquet", manifest.parent / "alice" / "shard-01.parquet"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    done = process("verify", manifest, "--trust", key_pairs.trust("alice"), "--json")
    failures = {f["shard"]: (f["reason"], f["detail"]) for f in json.loads(done.stdout)["failures"]}
    assert done.returncode == 1
    assert failures["raw.bin"][0] == "digest-mismatch" and failures["raw.bin"][1].startswith("whole-file blake3 ")
    assert failures["alice/shard-00.parquet"][0] == failures["alice/shard-01.parquet"][0] == "swapped"


def test_verify_hashing_ahead_checks_sha256_where_the_manifest_signs_no_blake3(
    manifest: Path, key_pairs, resign
) -> None:
    """As its own process, to hash ahead (a test worker has threads)."""
    from dataclasses import replace

    resign(manifest, key_pairs.alice, lambda s: replace(s, blake3=None))
    assert process("verify", manifest, "--trust", key_pairs.trust("alice")).returncode == 0
    raw = manifest.parent / "raw.bin"
    raw.write_bytes(bytes([raw.read_bytes()[0] ^ 1]) + raw.read_bytes()[1:])
    done = process("verify", manifest, "--trust", key_pairs.trust("alice"))
    assert done.returncode == 1
    assert "FAIL raw.bin: digest-mismatch: whole-file sha256 " in done.stderr


def test_verify_hashing_ahead_accepts_chunk_signed_shards_of_4_mib_or_less_and_checks_their_chunks(
    tmp_path: Path, run: Run
) -> None:
    """`verify` as its own process, to hash ahead (a test worker has threads); keygen and sign in this one."""
    data = tmp_path / "data"
    data.mkdir()
    small = data / "three-chunks.bin"
    small.write_bytes(os.urandom(3 * 1024 * 1024 - 5))  # chunk-signed at 1 MiB, small enough for the children
    (data / "tiny.bin").write_bytes(b"not chunked")
    run("keygen", "--out", tmp_path / "k")
    signed = run("sign", data, "--key", tmp_path / "k.key", "--out", data / "m.json", "--source", "a", "--chunk-mib", 1)
    assert signed.returncode == 0, signed.stderr
    honest = process("verify", data / "m.json", "--trust", tmp_path / "k.pub")
    assert honest.returncode == 0, honest.stderr
    spoiled = bytearray(small.read_bytes())
    spoiled[1024 * 1024 + 7] ^= 1
    small.write_bytes(bytes(spoiled))
    done = process("verify", data / "m.json", "--trust", tmp_path / "k.pub")
    assert done.returncode == 1
    assert "FAIL three-chunks.bin: digest-mismatch: chunk 1 sha256 " in done.stderr
