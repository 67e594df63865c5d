"""`export-triton` in-process: a repository whose configs Triton's schema accepts; one-line errors."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from command_helpers import assert_one_line_error
from runtime.commands.export_triton import main


def test_writes_a_repository_triton_accepts(tiny_past_onnx, tmp_path, capsys):
    import tarfile

    report, environment = tmp_path / "report.json", tmp_path / "env.tar.gz"
    with tarfile.open(environment, "w:gz") as archive:  # a conda-pack archive in shape
        archive.add(tiny_past_onnx, arcname="bin/python")
    code = main([str(tiny_past_onnx), "--output", str(tmp_path / "repo"), "--name", "tiny", "--kind", "cpu",
                 "--max-rows", "4", "--max-prompt-tokens", "100", "--queue", "8", "--python-env", str(environment),
                 "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["models"] == {"tiny": "onnxruntime_onnx", "generate": "python (decoupled)"}
    assert data["limits"]["max_rows"] == "4" and data["limits"]["max_queue"] == "8"
    for name in ("tiny", "generate"):
        config = text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.name == name
    assert (tmp_path / "repo" / "generate" / "python-env.tar.gz").read_bytes() == environment.read_bytes()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["missing.onnx", "--output", "{tmp}/r"], "model not found: missing.onnx"),
    (["{model}", "--output", "{tmp}/r", "--max-rows", "0"], "--max-rows (max_rows) must be an integer from 1 to 4096, got 0"),
    (["{model}", "--output", "{tmp}/r", "--instances", "0"], "--instances must be from 1 to 1024, got 0"),
    (["{model}", "--output", "{tmp}/no/such/r"], "no/such does not exist; create it or choose another --output"),
    (["{model}", "--output", "{tmp}/r", "--decoder", "{tmp}/nothing.onnx"], "--decoder"),
    (["{model}", "--output", "{tmp}/r", "--gpus", "two"], "--gpus: takes all, a count from 1 to 64, or GPU ids"),
    (["{model}", "--output", "{tmp}/r", "--gpus", "1", "--device", "cpu"], "--gpus places generate on GPUs"),
])
def test_bad_input_is_one_error_line(tiny_past_onnx, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, model=tiny_past_onnx) for a in args]
    assert main(argv) == 2
    assert_one_line_error(capsys, "export-triton", message)
    assert not (tmp_path / "r").exists()


def test_limits_not_given_come_from_a_small_decoders_capacity(tiny_past_onnx, tiny_static_graph, tmp_path, capsys):
    """A 256-token static cache as --decoder: the default 256-token prompt limit left no room for new
    tokens and was refused; now the limits not given are sized to the cache."""
    static = tiny_static_graph(256)

    def limits(*extra):
        report, repo = tmp_path / "r.json", tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        code = main([str(tiny_past_onnx), "--output", str(repo), "--kind", "cpu", "--decoder", str(static),
                     "--json", str(report), *extra])
        assert code == 0, capsys.readouterr().err
        return json.loads(report.read_text())["limits"]

    found = limits()
    assert (found["max_prompt_tokens"], found["max_new_tokens"]) == ("128", "128")
    assert "the decoder holds 256 tokens per row: --max-prompt-tokens 128, --max-new-tokens-limit 128" in \
        capsys.readouterr().out
    found = limits("--max-prompt-tokens", "200")  # a given limit is kept; the new tokens take what is left
    assert (found["max_prompt_tokens"], found["max_new_tokens"]) == ("200", "56")
    assert main([str(tiny_past_onnx), "--output", str(tmp_path / "r"), "--decoder", str(static),
                 "--max-prompt-tokens", "256"]) == 2
    assert_one_line_error(capsys, "export-triton", "--max-prompt-tokens (max_prompt_tokens) 256 leaves no room")


@pytest.mark.parametrize("gpus, placed", [("1", [0]), ("2", [0, 1]), ("8", list(range(8))), ("device=1,3", [1, 3]),
                                          ("all", [])])
def test_gpus_place_one_generate_decoder_per_gpu(tiny_past_onnx, tmp_path, capsys, gpus, placed):
    """Configs for 1, 2 and 8 GPUs (and a list, and all) that Triton's schema accepts: generate's
    instances and the model entry's on those GPUs (all: every GPU, Triton's default for KIND_GPU)."""
    code = main([str(tiny_past_onnx), "--output", str(tmp_path / "repo"), "--gpus", gpus, "--generate-instances", "2"])
    assert code == 0, capsys.readouterr().err
    for name in ("rotary", "generate"):
        config = text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == placed
    assert group.count == 2
