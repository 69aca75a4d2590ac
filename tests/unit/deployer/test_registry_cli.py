"""`modelfleet model ...` and `modelfleet keys generate`, run as a user would (CliRunner)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from typer.testing import Result

Cli = Callable[..., Result]


def test_register_list_show_download_delete(cli: Cli, digits_onnx: Path, tmp_path: Path) -> None:
    out = cli("model", "register", "-n", "digits", "-p", str(digits_onnx), "--tag", "stage=dev",
              "--property", "accuracy=0.97", "-d", "first")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "registered digits:1 (onnx" in out.stdout
    again = cli("model", "register", "-n", "digits", "-p", str(digits_onnx))
    assert again.exit_code == 0
    assert "identical bytes are already registered as digits:1" in again.stdout

    listed = json.loads(cli("model", "list", "-o", "json").stdout)
    assert [(m["name"], m["version"], m["tags"]) for m in listed] == [
        ("digits", 1, {"stage": "dev"})
    ]
    table = cli("model", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "VERSION", "FRAMEWORK"]

    shown = json.loads(cli("model", "show", "digits:1", "--output", "json").stdout)
    assert shown["properties"] == {"accuracy": "0.97"} and shown["description"] == "first"
    assert shown["sha256"] == hashlib.sha256(digits_onnx.read_bytes()).hexdigest()

    got = cli("model", "download", "digits:1", "--to", str(tmp_path / "out"))
    assert got.exit_code == 0
    assert (tmp_path / "out" / "model.onnx").read_bytes() == digits_onnx.read_bytes()

    deleted = cli("model", "delete", "digits:1")
    assert deleted.exit_code == 0 and "deleted digits:1" in deleted.stdout
    assert deleted.stderr == ""  # the result once, on stdout
    assert json.loads(cli("model", "list", "-o", "json").stdout) == []


def test_user_errors_are_one_line_with_a_hint_and_no_traceback(
    cli: Cli, digits_onnx: Path, tmp_path: Path
) -> None:
    missing = cli("model", "register", "-n", "digits", "-p", str(tmp_path / "nope.onnx"))
    assert missing.exit_code == 1
    assert f"error: model path {tmp_path / 'nope.onnx'} does not exist" in missing.stderr
    assert "hint: check the --path/-p argument" in missing.stderr
    assert "Traceback" not in missing.output

    cli("model", "register", "-n", "digits", "-p", str(digits_onnx))
    unknown = cli("model", "show", "digits:3")
    assert unknown.exit_code == 1
    assert "error: model 'digits' has no version 3" in unknown.stderr
    assert "hint: registered versions: 1" in unknown.stderr

    no_version = cli("model", "delete", "digits")
    assert "error: model reference 'digits' needs a version" in no_version.stderr

    bad_tag = cli("model", "register", "-n", "digits", "-p", str(digits_onnx), "--tag", "oops")
    assert bad_tag.exit_code == 1 and "error: --tag 'oops' is not KEY=VALUE" in bad_tag.stderr

    assert "Traceback" in cli("--debug", "model", "show", "digits:3").stderr


def test_signed_register_verifies_with_the_generated_public_key(
    cli: Cli, digits_onnx: Path, tmp_path: Path
) -> None:
    made = json.loads(cli("keys", "generate", "--out", str(tmp_path / "keys"), "-o", "json").stdout)
    assert (tmp_path / "keys" / "signing-key.pem").stat().st_mode & 0o777 == 0o600
    refused = cli("keys", "generate", "--out", str(tmp_path / "keys"))
    assert refused.exit_code == 1 and "refusing to overwrite a signing key" in refused.stderr

    out = cli("model", "register", "-n", "digits", "-p", str(digits_onnx),
              "--sign-key", made["private_key"], "-o", "json")  # fmt: skip
    model = json.loads(out.stdout)
    public = serialization.load_pem_public_key(Path(made["public_key"]).read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(model["signature"]), bytes.fromhex(model["sha256"]))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert model["key_id"] == made["key_id"] == hashlib.sha256(raw).hexdigest()[:16]


def test_a_non_ed25519_sign_key_is_refused(cli: Cli, digits_onnx: Path, tmp_path: Path) -> None:
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "rsa.pem").write_bytes(pem)
    (tmp_path / "junk.pem").write_text("not a key")
    rsa_out = cli("model", "register", "-n", "d", "-p", str(digits_onnx),
                  "--sign-key", str(tmp_path / "rsa.pem"))  # fmt: skip
    assert rsa_out.exit_code == 1 and "not an Ed25519 private key" in rsa_out.stderr
    junk = cli("model", "register", "-n", "d", "-p", str(digits_onnx),
               "--sign-key", str(tmp_path / "junk.pem"))  # fmt: skip
    assert "is not an unencrypted PEM private key" in junk.stderr
    assert json.loads(cli("model", "list", "-o", "json").stdout) == []


def test_a_folder_model_downloads_as_the_folder(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    (folder / "assets").mkdir(parents=True)
    (folder / "score_helpers.py").write_text("X = 1\n")
    (folder / "assets" / "labels.txt").write_text("zero\none\n")
    shown = json.loads(cli("model", "register", "-n", "bundle", "-p", str(folder), "-o", "json").stdout)
    assert (shown["format"], shown["framework"], shown["filename"]) == ("tar", "custom", "bundle")
    out = cli("model", "download", "bundle:1", "--to", str(tmp_path / "out"), "-o", "json")
    target = Path(json.loads(out.stdout)["path"])
    assert target == tmp_path / "out" / "bundle"
    assert (target / "assets" / "labels.txt").read_text() == "zero\none\n"
    assert (target / "score_helpers.py").read_text() == "X = 1\n"


def test_a_service_that_cannot_be_stopped_is_kept_unless_forced(cli: Cli) -> None:
    from modelfleet.deployer.registry import Registry
    from modelfleet.deployer.targets.base import ServiceRecord

    registry = Registry()
    registry.reserve_service("orphan", "retired-target", {})
    registry.save_service(ServiceRecord("orphan", "retired-target", "healthy"))
    out = cli("service", "delete", "orphan")
    assert out.exit_code == 1
    assert "error: unknown deployment target 'retired-target'" in out.stderr
    assert "`modelfleet service delete orphan --force` forgets it anyway" in out.stderr
    assert registry.get_service("orphan").state == "failed"
    forced = cli("service", "delete", "orphan", "--force")
    assert forced.exit_code == 0 and "deleted orphan" in forced.stdout
    assert registry.list_services() == []


def test_download_refuses_a_file_as_folder_and_never_overwrites(
    cli: Cli, digits_onnx: Path, tmp_path: Path
) -> None:
    cli("model", "register", "-n", "digits", "-p", str(digits_onnx))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    into_file = cli("model", "download", "digits:1", "--to", str(a_file))
    assert into_file.exit_code == 1 and "Traceback" not in into_file.output
    assert f"error: cannot write the model to {a_file}" in into_file.stderr
    assert "hint: --to must be a folder you can write to" in into_file.stderr

    existing = tmp_path / "out" / "model.onnx"
    existing.parent.mkdir()
    existing.write_text("someone else's model")
    again = cli("model", "download", "digits:1", "--to", str(existing.parent))
    assert again.exit_code == 1
    assert f"error: {existing} already exists; nothing was written" in again.stderr
    assert existing.read_text() == "someone else's model" and a_file.read_text() == "mine"


def test_a_registry_db_that_is_not_a_database_is_named_and_left_untouched(
    cli: Cli, home: Path
) -> None:
    home.mkdir(parents=True)
    db = home / "registry.db"
    db.write_bytes(b"these are not the pages you are looking for" * 100)
    before = db.read_bytes()
    out = cli("model", "list")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert f"error: registry database {db} is unreadable: file is not a database" in out.stderr
    assert "hint: restore it from a backup, or move it away" in out.stderr
    assert db.read_bytes() == before


def test_regen_key_refuses_a_weak_or_duplicate_value_and_keeps_the_keys(
    cli: Cli, home: Path
) -> None:
    from modelfleet.deployer.registry import Registry
    from modelfleet.deployer.targets.base import ServiceRecord

    keys_file = home / "services" / "keyed" / "secrets" / "keys.json"
    keys_file.parent.mkdir(parents=True)
    keys = {"primary": "primary-key-1", "secondary": "secondary-key-1"}
    keys_file.write_text(json.dumps(keys))
    registry = Registry()
    registry.reserve_service("keyed", "local", {})
    registry.save_service(
        ServiceRecord("keyed", "local", "healthy", target_data={"keys_file": str(keys_file)})
    )
    spaced = cli("service", "regen-key", "keyed", "--key", "primary", "--value", "has a space")
    assert spaced.exit_code == 2
    assert "error: --value: expected a key of at least 8 characters without spaces" in spaced.stderr
    same = cli("service", "regen-key", "keyed", "--key", "primary", "--value", "secondary-key-1")
    assert same.exit_code == 2
    assert "error: --value is the secondary key; the two keys must differ" in same.stderr
    assert json.loads(keys_file.read_text()) == keys
    chosen = cli("service", "regen-key", "keyed", "-k", "secondary", "--value", "new-secret-2")
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(keys_file.read_text()) == {**keys, "secondary": "new-secret-2"}

    negative = cli("service", "logs", "keyed", "--tail", "-1")
    assert negative.exit_code == 2 and "greater than or equal to 0" in negative.output


def test_a_keys_file_without_both_keys_is_named_not_a_traceback(cli: Cli, home: Path) -> None:
    from modelfleet.deployer.registry import Registry
    from modelfleet.deployer.targets.base import ServiceRecord

    keys_file = home / "services" / "halfkeyed" / "secrets" / "keys.json"
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(json.dumps({"primary": "primary-key-1"}))
    registry = Registry()
    registry.reserve_service("halfkeyed", "local", {})
    registry.save_service(
        ServiceRecord("halfkeyed", "local", "healthy", target_data={"keys_file": str(keys_file)})
    )
    out = cli("service", "keys", "halfkeyed")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert f"error: the keys file of halfkeyed ({keys_file}) has no secondary key" in out.stderr
    assert keys_file.read_text() == json.dumps({"primary": "primary-key-1"})


def test_registering_identical_bytes_with_a_sign_key_signs_the_existing_version(
    cli: Cli, digits_onnx: Path, tmp_path: Path
) -> None:
    from modelfleet.deployer.registry import Registry

    first = json.loads(cli("keys", "generate", "--out", str(tmp_path / "k1"), "-o", "json").stdout)
    other = json.loads(cli("keys", "generate", "--out", str(tmp_path / "k2"), "-o", "json").stdout)
    assert cli("model", "register", "-n", "digits", "-p", str(digits_onnx)).exit_code == 0

    signed = cli("model", "register", "-n", "digits", "-p", str(digits_onnx),
                 "--sign-key", first["private_key"])  # fmt: skip
    assert signed.exit_code == 0, signed.output
    assert signed.stdout.strip() == (
        f"identical bytes already registered as digits:1; signature added (key {first['key_id']})"
    )
    shown = json.loads(cli("model", "show", "digits:1", "-o", "json").stdout)
    assert shown["key_id"] == first["key_id"]
    public = serialization.load_pem_public_key(Path(first["public_key"]).read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(shown["signature"]), bytes.fromhex(shown["sha256"]))
    # what devices get: the version reference the artifact server hands out
    ref = Registry().model_ref(Registry().get_model("digits", 1), "http://127.0.0.1:1")
    assert (ref.signature, ref.key_id) == (shown["signature"], first["key_id"])

    same_key = cli("model", "register", "-n", "digits", "-p", str(digits_onnx),
                   "--sign-key", first["private_key"], "-o", "json")  # fmt: skip
    again = json.loads(same_key.stdout)
    assert again["created"] is False and again["signature_added"] is False
    assert again["signature"] == shown["signature"]

    refused = cli("model", "register", "-n", "digits", "-p", str(digits_onnx),
                  "--sign-key", other["private_key"])  # fmt: skip
    assert refused.exit_code == 1
    assert (
        f"error: identical bytes are already registered as digits:1, signed by key "
        f"{first['key_id']}; a version carries one signature, so key {other['key_id']} "
        "cannot be added"
    ) in refused.stderr
    assert "`modelfleet model delete digits:1` and register again" in refused.stderr
    after = json.loads(cli("model", "show", "digits:1", "-o", "json").stdout)
    assert after["key_id"] == first["key_id"] and after["signature"] == shown["signature"]
    assert [m["version"] for m in json.loads(cli("model", "list", "-o", "json").stdout)] == [1]
