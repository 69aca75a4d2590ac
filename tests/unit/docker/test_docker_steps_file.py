"""extraDockerfileSteps: parsed, checked and rewritten before any build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfleet.deployer.config import inference_from_jsonable, load_inference_config, to_jsonable
from modelfleet.deployer.targets.docker_steps import ExtraStepsError, load_extra_steps


def steps_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "steps.docker"
    path.write_text(text)
    return path


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "conf").mkdir(parents=True, exist_ok=True)
    (src / "conf" / "app.yaml").write_text("a: 1\n")
    return src


def test_steps_keep_their_order_and_copy_sources_move_into_the_context(tmp_path: Path) -> None:
    path = steps_file(
        tmp_path,
        "# comment\n"
        "ENV FOO=bar\n"
        "\n"
        "RUN echo ok \\\n"
        "    > /etc/marker\n"
        "COPY --chown=10001:10001 conf/app.yaml /etc/app/\n"
        'COPY ["conf/app.yaml", "/etc/app.yaml"]\n'
        "COPY . /opt/src\n"
        "COPY --from=modelfleet/base:x /etc/os-release /tmp/\n",
    )
    extra = load_extra_steps(path, source(tmp_path))
    assert [s.line for s in extra.steps] == [2, 4, 6, 7, 8, 9]
    assert extra.dockerfile.splitlines() == [
        "ENV FOO=bar",
        "RUN echo ok > /etc/marker",
        "COPY --chown=10001:10001 source/conf/app.yaml /etc/app/",
        'COPY ["source/conf/app.yaml", "/etc/app.yaml"]',
        "COPY source /opt/src",
        "COPY --from=modelfleet/base:x /etc/os-release /tmp/",
    ]
    assert extra.source_directory == source(tmp_path)


def test_key_follows_the_steps_and_the_files_a_copy_reads(tmp_path: Path) -> None:
    src = source(tmp_path)
    path = steps_file(tmp_path, "COPY conf /etc/conf\n")
    first = load_extra_steps(path, src).key
    assert load_extra_steps(path, src).key == first, "unchanged file and sources: same key"
    (src / "conf" / "app.yaml").write_text("a: 2\n")
    assert load_extra_steps(path, src).key != first, "a copied file changed"
    no_copy = steps_file(tmp_path, "ENV FOO=bar\n")
    key = load_extra_steps(no_copy, src).key
    (src / "conf" / "app.yaml").write_text("a: 3\n")
    assert load_extra_steps(no_copy, src).key == key, "sources do not matter without COPY"
    assert load_extra_steps(steps_file(tmp_path, "ENV FOO=baz\n"), src).key != key


def test_blank_and_comment_lines_inside_a_continuation_are_dropped_as_docker_does(
    tmp_path: Path,
) -> None:
    path = steps_file(tmp_path, "RUN echo a \\\n\n    # why\n    b > /x\nENV C=1\n")
    extra = load_extra_steps(path, None)
    assert [(s.line, s.written) for s in extra.steps] == [(1, "RUN echo a b > /x"), (5, "ENV C=1")]


def test_key_follows_a_copied_symlink_and_skips_cache_folders(tmp_path: Path) -> None:
    """The context keeps a symlink as a link: a new target is a new image."""
    src = source(tmp_path)
    (src / "conf" / "other.yaml").write_text("b: 1\n")
    (src / "conf" / "current.yaml").symlink_to("app.yaml")
    path = steps_file(tmp_path, "COPY conf /etc/conf\n")
    first = load_extra_steps(path, src, skip_names=frozenset({"__pycache__"})).key
    (src / "conf" / "current.yaml").unlink()
    (src / "conf" / "current.yaml").symlink_to("other.yaml")
    second = load_extra_steps(path, src, skip_names=frozenset({"__pycache__"})).key
    assert second != first, "a symlink retargeted"
    (src / "conf" / "__pycache__").mkdir()
    (src / "conf" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert load_extra_steps(path, src, skip_names=frozenset({"__pycache__"})).key == second


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ENV A=1\nFROM debian\n", r"steps.docker line 2: FROM is not allowed: .*baseImage"),
        ('CMD ["x"]\n', r"line 1: CMD is not allowed: .*entry point"),
        ("ENTRYPOINT /bin/sh\n", r"line 1: ENTRYPOINT is not allowed"),
        (
            "ADD https://example.com/x.tgz /tmp/\n",
            r"line 1: ADD https://example.com/x.tgz needs the network",
        ),
        (
            "COPY ../secret /tmp/\n",
            r"line 1: COPY source ../secret is outside the source directory",
        ),
        ("COPY a/../../b /tmp/\n", r"outside the source directory"),
        ("COPY onlyone\n", r"line 1: COPY needs a source and a destination"),
        ('COPY ["a", \n', r"line 1: COPY is not a valid JSON array"),
        ("# nothing but a comment\n\n", r"has no Dockerfile steps"),
    ],
)
def test_bad_steps_are_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ExtraStepsError, match=message):
        load_extra_steps(steps_file(tmp_path, text), source(tmp_path))


def test_copy_without_a_source_directory_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ExtraStepsError, match="has no sourceDirectory") as err:
        load_extra_steps(steps_file(tmp_path, "ENV A=1\nCOPY x /x\n"), None)
    assert "line 2" in str(err.value)
    assert "sourceDirectory" in err.value.hint


def test_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExtraStepsError, match=r"extraDockerfileSteps file .*nope does not exist"):
        load_extra_steps(tmp_path / "nope", None)
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ExtraStepsError, match="cannot read extraDockerfileSteps file"):
        load_extra_steps(binary, None)


def test_inference_config_carries_the_steps_path(tmp_path: Path) -> None:
    src = source(tmp_path)
    (src / "score.py").write_text("def init(): pass\ndef run(d): return d\n")
    steps_file(tmp_path, "ENV FOO=bar\n")
    ic = tmp_path / "inferenceconfig.json"
    ic.write_text(
        json.dumps(
            {
                "entryScript": "score.py",
                "sourceDirectory": "src",
                "extraDockerfileSteps": "steps.docker",
            }
        )
    )
    config = load_inference_config(ic)
    assert config.extra_dockerfile_steps == (tmp_path / "steps.docker").resolve()
    # as the service record stores it, for a later update
    assert inference_from_jsonable(to_jsonable(config)) == config
