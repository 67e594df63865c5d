"""Every class of bad input, for every command, ends in one `error:` line and a non-zero exit
before any expensive work, and changes no file. Table-driven: (command, arguments, words the
message must hold, exit code). The fuzzer below mutates real files the same way."""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

COMMANDS = {"export-model": "export_model", "check-parity": "check_parity", "generate": "generate",
            "benchmark": "benchmark", "build-engine": "build_engine", "export-triton": "export_triton",
            "package-edge": "package_edge", "loadtest": "loadtest", "serve": "serve"}


def read_only_folder() -> str | None:
    """A folder where even root cannot create files (so the check is real, not mocked)."""
    for candidate in ("/sys", "/proc"):
        try:
            tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
    return None


READ_ONLY = read_only_folder()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_onnx, tiny_past_onnx, tiny_static_onnx, tiny_portable_static_onnx, tiny_model,
          upstream_model):
    """A folder of good and bad inputs; tests must leave every one of them unchanged."""
    from models.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copy(tiny_past_onnx, root / "model.onnx")
    shutil.copy(tiny_static_onnx, root / "static.onnx")
    shutil.copy(tiny_onnx, root / "plain.onnx")  # no key/value cache
    shutil.copy(tiny_portable_static_onnx, root / "portable.onnx")  # a 96-token window
    save_checkpoint(tiny_model, root / "ck.safetensors")
    good = (root / "model.onnx").read_bytes()
    (root / "truncated.onnx").write_bytes(good[: len(good) // 3])
    (root / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.onnx").write_bytes(b"")
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), str(root / "foreign.onnx"))
    (root / "list-sidecar.engine").write_bytes(b"plan")
    (root / "list-sidecar.engine.json").write_text("[1, 2, 3]")
    (root / "no-sidecar.engine").write_bytes(b"plan")
    (root / "shards").mkdir()
    (root / "shards" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (root / "bad-profiles.engine").write_bytes(b"plan")
    (root / "bad-profiles.engine.json").write_text(json.dumps(
        {"profiles": [{"input_ids": [[1, 1], [1, 8]]}], "options": {}, "flavour": "tensorrt", "library_version": "10.0",
         "gpu_name": "H200", "compute_capability": "9.0", "onnx_sha256": "0", "build_seconds": 1.0,
         "format": "rotary-deploy-engine/1"}))
    state = {k: v for k, v in upstream_model.state_dict().items() if k != "layers.1.0.to_out.weight"}
    torch.save(state, root / "incomplete-upstream.pt")
    (root / "adir").mkdir()
    return root


def run(command: str, argv: list[str], capsys) -> tuple[int, str]:
    module = importlib.import_module(f"runtime.commands.{COMMANDS[command]}")
    code = module.main(argv)
    return code, capsys.readouterr().err


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in root.iterdir()}


# (command, argv with {root} for the folder of inputs, words the error line holds, exit code)
MATRIX = [
    # export-model
    ("export-model", ["--checkpoint", "{root}/missing.pt", "-o", "{root}/m.onnx"], ["checkpoint not found"], 2),
    ("export-model", ["--checkpoint", "{root}/ck.safetensors", "-o", "{root}/ck.safetensors"],
     ["--output", "is also the --checkpoint input"], 2),
    ("export-model", ["-o", "{root}/m.onnx", "--json", "{root}/m.onnx"], ["--json and --output both name"], 2),
    ("export-model", ["-o", "{readonly}/m.onnx"], ["cannot write --output"], 2),
    ("export-model", ["-o", "{root}/m.onnx", "--json", "{readonly}/r.json"], ["cannot write --json"], 2),
    ("export-model", ["-o", "{root}/adir"], ["it is a directory"], 2),
    ("export-model", ["-o", "{root}/model.onnx/x.onnx"], ["is a file, not a directory"], 2),
    ("export-model", ["--opset", "16", "-o", "{root}/m.onnx"], ["opset 16 is not supported"], 2),
    ("export-model", ["--opset", "seventeen"], ["argument --opset", "invalid int value"], 2),
    ("export-model", ["--static-cache", "0", "-o", "{root}/m.onnx"], ["argument --static-cache", "must be in [1"], 2),
    ("export-model", ["--static-cache", "1000000000000", "-o", "{root}/m.onnx"], ["static cache", "needs about"], 2),
    ("export-model", ["--static-cache", "8", "--dtype", "bf16", "-o", "{root}/m.onnx"], ["not bf16"], 2),
    ("export-model", ["--config", "[1, 2]", "-o", "{root}/m.onnx"], ["must be a JSON object"], 2),
    ("export-model", ["--config", "{root}/random.onnx", "-o", "{root}/m.onnx"],
     ["random.onnx is not text; give a JSON file of model config fields"], 2),
    ("export-model", ["--config", '{"dim": "64"}', "-o", "{root}/m.onnx"], ["dim must be a positive integer"], 2),
    ("export-model", ["--config", '{"theta": "big"}', "-o", "{root}/m.onnx"], ["theta must be a finite number"], 2),
    ("export-model", ["--config", '{"causal": "yes"}', "-o", "{root}/m.onnx"], ["causal must be true or false"], 2),
    ("export-model", ["--config", "{root}/adir", "-o", "{root}/m.onnx"], ["is a directory"], 2),
    ("export-model", ["--init-seed", "-1", "-o", "{root}/m.onnx"], ["argument --init-seed", "must be in [0"], 2),
    ("export-model", ["--checkpoint", "{root}/incomplete-upstream.pt", "-o", "{root}/m.onnx"],
     ["lacks the tensor 'layers.1.0.to_out.weight'"], 2),
    ("export-model", ["--checkpoint", "{root}/model.onnx", "-o", "{root}/m.onnx"],
     ["not a safetensors file or a torch.save'd state_dict"], 2),
    # check-parity
    ("check-parity", ["{root}/missing.onnx"], ["ONNX model not found"], 2),
    ("check-parity", ["{root}/ck.safetensors"], ["not an ONNX graph", "give the .onnx file export-model wrote"], 2),
    ("check-parity", ["{root}/model.onnx", "--checkpoint", "{root}/shards/model.safetensors.index.json"],
     ["for a sharded checkpoint pass its folder", "/shards"], 2),
    ("check-parity", ["{root}/static.onnx", "--backend", "onnxruntime-cuda", "--checkpoint", "{root}/ck.safetensors"],
     ["the onnxruntime-cuda backend runs on a CUDA GPU", "use --backend onnxruntime here"], 2),
    ("check-parity", ["{root}/truncated.onnx"], ["truncated.onnx: not a valid ONNX file"], 2),
    ("check-parity", ["{root}/random.onnx"], ["random.onnx: not a valid ONNX file"], 2),
    ("check-parity", ["{root}/foreign.onnx"], ["not a graph written by this toolkit"], 2),
    ("check-parity", ["{root}/model.onnx", "--atol", "nan"], ["argument --atol", "finite"], 2),
    ("check-parity", ["{root}/model.onnx", "--atol", "-1"], ["argument --atol", "must be in [0.0"], 2),
    ("check-parity", ["{root}/model.onnx", "--generate", "-1"], ["argument --generate", "must be in [0"], 2),
    ("check-parity", ["{root}/model.onnx", "--batch", "0"], ["argument --batch", "integers >= 1"], 2),
    ("check-parity", ["{root}/model.onnx", "--seq", "1,x"], ["argument --seq", "comma-separated integers"], 2),
    ("check-parity", ["{root}/model.onnx", "--seq", "100000000"], ["largest case", "needs about"], 2),
    ("check-parity", ["{root}/model.onnx", "--json", "{root}/model.onnx"], ["is also the MODEL input"], 2),
    ("check-parity", ["{root}/model.onnx", "--json", "{readonly}/p.json"], ["cannot write --json"], 2),
    ("check-parity", ["{root}/model.onnx", "--backend", "tflite"], ["argument --backend", "invalid choice"], 2),
    ("check-parity", ["{root}/model.onnx", "--preset", "tiny", "--init-seed", "3"], ["are not the files", "sha256"], 2),
    ("check-parity", ["{root}/list-sidecar.engine", "--backend", "tensorrt"], ["sidecar", "expected a JSON object"], 2),
    ("check-parity", ["{root}/no-sidecar.engine", "--backend", "tensorrt"], ["sidecar", "is missing"], 2),
    ("check-parity", ["{root}/static.onnx", "--backend", "tensorrt"], ["static-cache graphs run on ONNX Runtime"], 2),
    ("check-parity", ["{root}/static.onnx", "--seq", "17,100"],
     ["--seq 100 does not fit this graph's 96-token static cache with the sweep's 8 decode steps; use --seq up to 88"], 2),
    # generate
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--temperature", "nan"],
     ["argument --temperature", "finite"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--temperature", "inf"],
     ["argument --temperature", "finite"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--eos-id", "999"],
     ["--eos-id 999 is outside the vocabulary 0..255"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1,x"], ["argument --prompt-ids"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1,-2"], ["argument --prompt-ids", ">= 0"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "256"], ["token id 256 is out of range"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--filter-thres", "1.5"],
     ["argument --filter-thres", "must be in [0.0, 1.0)"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--max-new-tokens", "0"],
     ["argument --max-new-tokens"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--max-new-tokens", "100000000000"],
     ["needs about", "fewer new tokens"], 2),
    ("generate", ["--model", "{root}/foreign.onnx", "--prompt-ids", "1"], ["not a graph written by this toolkit"], 2),
    ("generate", ["--model", "{root}/truncated.onnx", "--prompt-ids", "1"], ["not a valid ONNX file"], 2),
    ("generate", ["--model", "{root}/static.onnx", "--prompt-ids", "1", "--max-new-tokens", "200"],
     ["the 1-token prompt plus --max-new-tokens 200 is 201 tokens, past the 96 a row of", "lower --max-new-tokens"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt", ""], ["--prompt is empty"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--backend", "torch", "--prompt-ids", "1"],
     ["--backend torch runs the PyTorch weights of the model flags, not --model"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--checkpoint", "{root}/ck.safetensors", "--prompt-ids", "1"],
     ["--checkpoint does not apply to --model", "carries its own weights"], 2),
    ("check-parity", ["{root}/plain.onnx", "--past", "5"], ["--past sets cached lengths", "has no key/value cache"], 2),
    ("serve", ["{root}/static.onnx", "--max-cache", "64"], ["--max-cache is for serving weights without MODEL"], 2),
    ("serve", ["{root}/static.onnx", "--preset", "tiny"], ["--preset is for serving weights without MODEL"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--backend", "tensorrt", "--prompt-ids", "1"],
     ["--backend tensorrt runs an engine (.engine or .plan) and", "is not one; build one with build-engine"], 2),
    ("generate", ["--model", "{root}/list-sidecar.engine", "--backend", "onnxruntime", "--prompt-ids", "1"],
     ["is an engine, which --backend onnxruntime cannot run; use --backend tensorrt"], 2),
    ("generate", ["--model", "{root}/empty.onnx", "--prompt-ids", "1"], ["is empty (0 bytes)", "export it again"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--python-env", "{root}/adir"],
     ["--python-env", "adir is a directory; give the file"], 2),
    ("build-engine", ["{root}/truncated.onnx", "-o", "{root}/e.engine"], ["cannot read ONNX file",
                                                                          "export it again with export-model"], 2),
    ("generate", ["--model", "{root}/adir", "--prompt-ids", "1"], ["adir is a directory; give the .onnx graph"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--json", "{readonly}/g.json"],
     ["cannot write --json"], 2),
    ("generate", ["--model", "{root}/model.onnx", "--prompt-ids", "1", "--json", "{root}/model.onnx"],
     ["is also the --model input"], 2),
    ("generate", ["--backend", "onnxruntime", "--prompt-ids", "1"], ["--model is required"], 2),
    ("generate", ["--backend", "onnxruntime-cuda-static-portable", "--checkpoint", "{root}/ck.safetensors",
                  "--prompt-ids", "1"], ["runs on a CUDA GPU", "--backend onnxruntime-static-portable here"], 2),
    ("generate", ["--model", "{root}/static.onnx", "--backend", "onnxruntime-cuda", "--prompt-ids", "1"],
     ["the onnxruntime-cuda backend runs on a CUDA GPU", "use --backend onnxruntime here"], 2),
    # benchmark
    ("benchmark", ["{root}/model.onnx", "--iters", "0"], ["argument --iters", "must be in [1"], 2),
    ("benchmark", ["{root}/model.onnx", "--warmup", "-1"], ["argument --warmup", "must be in [0"], 2),
    ("benchmark", ["{root}/model.onnx", "--backend", "foo"], ["unknown backend 'foo'"], 2),
    ("benchmark", ["{root}/foreign.onnx"], ["not a graph written by this toolkit"], 2),
    ("benchmark", ["{root}/random.onnx"], ["not a valid ONNX file"], 2),
    ("benchmark", ["{root}/model.onnx", "--json", "{root}/b.out", "--plot", "{root}/b.out"], ["both name"], 2),
    ("benchmark", ["{root}/model.onnx", "--plot", "{readonly}/b.png"], ["cannot write --plot"], 2),
    ("benchmark", ["{root}/model.onnx", "--backend", "torch", "--context", "1000000000"], ["needs about"], 2),
    # (a machine without CUDA, as CI's: a CUDA backend named there is skipped, its reason naming the fix)
    ("benchmark", ["{root}/model.onnx", "--backend", "torch-compile"],
     ["no backend ran", "the torch-compile backend runs on a CUDA GPU", "or use --backend torch here"], 1),
    ("benchmark", ["--backend", "onnxruntime-cuda-static", "--checkpoint", "{root}/ck.safetensors"],
     ["no backend ran", "the onnxruntime-cuda-static backend runs on a CUDA GPU", "onnxruntime-static here"], 1),
    ("benchmark", ["{root}/model.onnx", "--backend", "torch,tensorrt"], ["--backend tensorrt runs an engine; give "
                                                                         "--engine PATH", "or drop tensorrt"], 2),
    ("benchmark", ["--backend", "onnxruntime"], ["--backend onnxruntime runs MODEL.onnx", "give MODEL or drop"], 2),
    ("benchmark", ["{root}/model.onnx", "--backend", "onnxruntime", "--checkpoint", "{root}/ck.safetensors"],
     ["--checkpoint sets the weights of the backends that run PyTorch weights, and none of onnxruntime does"], 2),
    ("benchmark", ["{root}/model.onnx", "--backend", "tensorrt", "--engine", "{root}/missing.engine"],
     ["--engine", "missing.engine is not a file"], 2),
    # build-engine
    ("build-engine", ["{root}/foreign.onnx", "-o", "{root}/e.engine"], ["not a graph written by this toolkit"], 2),
    ("build-engine", ["{root}/static.onnx", "-o", "{root}/e.engine"], ["static-cache graph"], 2),
    ("build-engine", ["{root}/model.onnx", "-o", "{root}/model.onnx"], ["is also the MODEL input"], 2),
    ("build-engine", ["{root}/model.onnx", "-o", "{root}/e.engine", "--batch", "0:1:2"],
     ["sizes must be at least 1"], 2),
    ("build-engine", ["{root}/model.onnx", "--workspace", "0"], ["argument --workspace"], 2),
    ("build-engine", ["{root}/portable.onnx", "-o", "{root}/e.engine", "--seq", "1:1:500"],
     ["profile 0: --seq up to 500 tokens is past the 96 tokens a row of this graph holds; keep --seq's maximum "
      "within 96"], 2),
    ("build-engine", ["{root}/model.onnx", "--compute-capability", "abc"],
     ["argument --compute-capability: expected a compute capability such as 8.6 or 12.0, got 'abc'"], 2),
    ("build-engine", ["{root}/model.onnx", "-o", "{root}/e.engine", "--compute-capability", "8.6", "--flavor",
                      "tensorrt"], ["--compute-capability is TensorRT-RTX's", "pass --flavor tensorrt-rtx"], 2),
    ("build-engine", ["{root}/plain.onnx", "-o", "{root}/e.engine", "--past", "0:1:2"],
     ["--past sets cached lengths, and this graph has no key/value cache inputs"], 2),
    ("build-engine", ["{root}/adir", "-o", "{root}/e.engine"], ["MODEL", "adir is a directory; give the .onnx file"], 2),
    ("build-engine", ["{root}/static.onnx", "-o", "{root}/e.engine"], ["export-model --static-cache N --portable"], 2),
    ("build-engine", ["{root}/model.onnx", "-o", "{readonly}/e.engine"], ["cannot write --output"], 2),
    # export-triton (serve has its own matrix in test_serve_command.py)
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--max-batch-size", "1000000000000"],
     ["--max-batch-size must be from 0 to 2147483647, got 1000000000000"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--queue-delay-us", "-1"],
     ["--queue-delay-us must be from 0 to 2147483647"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--python-env", "{root}/model.onnx"],
     ["--python-env", "is not a .tar.gz archive"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--queue", "-1"],
     ["--queue (max_queue) must be an integer from 0"], 2),
    ("export-triton", ["{root}/bad-profiles.engine", "--output", "{root}/r"],
     ["sidecar", "profile 0 input 'input_ids' needs min, opt and max lists", "rebuild the engine"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--json", "{root}/model.onnx"],
     ["--json", "is also the MODEL input"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/r", "--json", "{root}/r"],
     ["--json", "is the --output folder", "choose a path outside it"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}/nodir/r"],
     ["cannot write --output", "nodir does not exist; create it or choose another --output"], 2),
    ("export-triton", ["{root}/model.onnx", "--output", "{root}"], ["--output", "holds the MODEL input"], 2),
    # package-edge
    ("package-edge", ["{root}/portable.onnx", "--target", "orin-nx-16gb", "--jetpack", "6.2", "--output", "{root}/e",
                      "--seq", "1:16:500"], ["--seq up to 500 tokens is past the 96 tokens a row of this graph holds"], 2),
    ("package-edge", ["{root}/model.onnx", "--target", "orin-nx-16gb", "--jetpack", "6.2", "--output", "{root}/e",
                      "--json", "{root}/model.onnx"], ["--json", "is also the MODEL.onnx input"], 2),
    ("package-edge", ["{root}/model.onnx", "--target", "orin-nx-16gb", "--jetpack", "6.2", "--output", "{root}/e",
                      "--json", "{root}/e/report.json"], ["--json", "is inside the --output folder"], 2),
    *[("package-edge", ["{root}/model.onnx", "--target", "orin-nx-16gb", "--jetpack", "6.2", "--output", "{root}/e",
                        "--workspace", value], ["--workspace must be from 1 to 1048576 MiB"], 2) for value in ("-1", "0")],
    *[("package-edge", ["{root}/model.onnx", "--target", "orin-nx-16gb", "--jetpack", "6.2", "--output", "{root}/e",
                        "--usable-gib", value], ["argument --usable-gib"], 2)
      for value in ("nan", "inf", "-2")],
    # serve (refused before tritonserver starts; more in test_serve_command.py)
    ("serve", ["{root}/static.onnx", "--max-rows", "100000000"], ["--max-rows (max_rows) must be an integer from 1 to 4096"], 2),
    ("serve", ["{root}/static.onnx", "--queue", "-1"], ["--queue (max_queue) must be an integer from 0"], 2),
    ("serve", ["{root}/static.onnx", "--openai-workers", "0"], ["--openai-workers must be at least 1"], 2),
    ("serve", ["{root}/static.onnx", "--port", "70000"], ["--port must be a port number 1-65535"], 2),
    ("serve", ["{root}/missing.onnx"], ["model not found"], 2),
    ("serve", ["--max-cache", "10", "--max-prompt-tokens", "256"],
     ["--max-prompt-tokens (max_prompt_tokens) 256 leaves no room for new tokens in the decoder's 10-token capacity"], 2),
    ("export-triton", ["{root}/static.onnx", "--output", "{root}/r", "--max-new-tokens-limit", "1000"],
     ["--max-new-tokens-limit (max_new_tokens) 1000 can never be reached", "lower it below"], 2),
    ("serve", ["{root}/static.onnx", "--json", "{root}/static.onnx"], ["--json", "is also the MODEL input"], 2),
    ("serve", ["{root}/static.onnx", "--log", "{root}/nodir/x.log"], ["cannot write --log", "does not exist"], 2),
    ("serve", ["{root}/static.onnx", "--log", "{root}/adir"], ["cannot write --log", "it is a directory"], 2),
    ("serve", ["--checkpoint", "{root}/ck.safetensors", "--log", "{root}/ck.safetensors"],
     ["--log", "is also the --checkpoint input"], 2),
    # loadtest (refused before it contacts any server)
    ("loadtest", ["--url", "ftp://127.0.0.1:8000"], ["argument --url: must be http:// or https:// addresses"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9,x"], ["argument --url: must be http:// or https:// addresses separated "
                                                     "by commas, got 'x'"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9,"], ["got 'an empty entry' in 'http://127.0.0.1:9,'"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9,http://127.0.0.1:9/"], ["argument --url: names a server more than once"],
     2),
    ("loadtest", ["--url", "http://127.0.0.1:9,http://127.0.0.1:10", "--grpc-url", "127.0.0.1:11"],
     ["--grpc-url names one server's address; with several --url"], 2),
    *[("loadtest", ["--url", "http://127.0.0.1:9", "--timeout", value], ["argument --timeout"], 2)
      for value in ("nan", "inf", "0")],
    ("loadtest", ["--url", "http://127.0.0.1:9", "--wait", "nan"], ["argument --wait"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9", "--requests", "0"], ["argument --requests: must be in [1, inf], got 0"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9", "--requests", "64", "--requests-per-client", "2"],
     ["argument --requests-per-client: not allowed with argument --requests"], 2),
    ("loadtest", ["--url", "http://127.0.0.1:9", "--seed", "-1"], ["argument --seed: must be in [0, inf], got -1"], 2),
    ("serve", ["{root}/static.onnx", "--start-timeout", "nan"], ["argument --start-timeout"], 2),
]


@pytest.mark.parametrize("command, argv, words, code", MATRIX,
                         ids=[f"{c}-{i}" for i, (c, *_rest) in enumerate(MATRIX)])
def test_bad_input_is_one_error_line_and_changes_nothing(files, command, argv, words, code, capsys):
    if any("{readonly}" in a for a in argv) and READ_ONLY is None:
        assert sys.platform != "linux", "/sys and /proc accepted a new file: the read-only cases would not test anything"
        pytest.skip("no read-only folder on this machine")
    before = digests(files)
    argv = [a.replace("{root}", str(files)).replace("{readonly}", str(READ_ONLY)) for a in argv]
    got, err = run(command, argv, capsys)
    lines = err.strip().splitlines()
    assert "internal error" not in err and "Traceback" not in err, err
    assert got == code and len(lines) == 1 and lines[0].startswith(f"{command}: error:"), err
    assert all(word in lines[0] for word in words), (words, lines[0])
    assert digests(files) == before


def test_token_id_zero_is_a_valid_prompt(files, capsys, tmp_path):
    report = tmp_path / "g.json"
    code, err = run("generate", ["--model", str(files / "model.onnx"), "--prompt-ids", "0,0,1",
                                 "--max-new-tokens", "3", "--json", str(report)], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["prompt_ids"] == [0, 0, 1]
