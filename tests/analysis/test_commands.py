"""`pldr inspect` and `pldr extract-G` end to end on a small model: the files they write, the
G_LM file's round trip into generation, and one-line errors."""

import json
import pickle
import re

import pytest
import torch

from pldr import PLDRConfig, PLDRModel, Tokenizer, generate, infer_G_LM, load_G_LM, load_model
from pldr.analysis import chunk_batches, data_chunks, extract_G_LM
from pldr.checkpoint.glm import load_G_LM_pairs
from pldr.cli import main
from pldr.data import load_documents
from fixture_utils import assert_same

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = PLDRConfig(num_layers=2, d_model=32, num_heads=2, dff=48, num_reslayerA=1,
                    num_denseA=2, A_dff=24, vocab_size=400, max_seq_len=48)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus, its tokenizer, a v510 model directory and a v510G one."""
    root = tmp_path_factory.mktemp("analysis")
    docs = load_documents("builtin")[:60]
    (root / "corpus.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    tok = Tokenizer.train(docs, 400, str(root / "tok"))
    torch.manual_seed(0)
    PLDRModel(CONFIG).save_pretrained(root / "m", tokenizer=tok)
    torch.manual_seed(1)
    G = torch.rand(CONFIG.num_layers, CONFIG.num_heads, CONFIG.dk, CONFIG.dk)
    PLDRModel(CONFIG.replace(variant="v510G"), G_LM=G).save_pretrained(root / "g", tokenizer=tok)
    return {"root": root, "data": str(root / "corpus.txt"), "tok": tok, "G": G}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_inspect_writes_valid_pictures_an_index_of_all_of_them_and_the_report(corpus, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "out"
    assert main(["inspect", "--model", str(corpus["root"] / "m"), "--text", "The class",
                 "--text", "A list is a sequence", "--ids", "5,6,7,8", "--out", str(out),
                 "--dtype", "float64"]) == 0
    table = capsys.readouterr().out
    assert "G_LM rmse" in table and "cache diff" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    # 3 inputs x 2 layers of heatmaps, the spread and the spectrum
    assert len(pngs) == 3 * 2 + 2
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    page = (out / "index.html").read_text()
    assert sorted(set(re.findall(r'src="([^"]+)"', page))) == pngs
    report = json.loads((out / "report.json").read_text())
    assert [L["layer"] for L in report["layers"]] == [0, 1]
    for L in report["layers"]:
        assert L["G_LM_rmse"] > 0 and L["cache_max_diff"] <= 1e-12
        assert len(L["heads"]) == 2 and len(L["heads"][0]["singular_values"]) == 3
    assert report["inputs"][2]["ids"] == [5, 6, 7, 8]
    assert report["kinds"] == ["A", "A_LM", "A_P", "G_LM"]


def test_inspect_layers_and_a_v510G_model(corpus, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["inspect", "--model", str(corpus["root"] / "g"), "--ids", "5,6,7",
                 "--ids", "9,10,11,12,13", "--out", str(out), "--layers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [L["layer"] for L in report["layers"]] == [1] and report["kinds"] == ["G_LM"]
    assert report["layers"][0]["G_LM_rmse"] == 0
    assert sorted(p.name for p in out.glob("input*.png")) == ["input0_layer1.png", "input1_layer1.png"]


def test_extract_G_on_a_v510G_model_returns_its_G_LM(corpus, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    assert main(["extract-G", "--model", str(corpus["root"] / "g"), "--data", corpus["data"],
                 "--samples", "5", "--batch-size", "2", "--context-length", "16",
                 "--out", str(out)]) == 0
    assert_same(torch.stack(load_G_LM(out))[:, 0], corpus["G"])
    A_LM, _ = load_G_LM_pairs(out)
    assert A_LM is None  # a v510G model has no A_LM
    report = json.loads((tmp_path / "g.safetensors.report.json").read_text())
    assert report["samples"] == 5 and all(L["G_LM_rmse_to_mean"] < 1e-7 for L in report["layers"])


@pytest.mark.parity
@pytest.mark.parametrize("fmt, name", [("safetensors", "mean.safetensors"), ("original", "mean.pkl")])
def test_extract_G_file_generates_as_the_mean_of_infer_G_LM_over_the_same_chunks(
        corpus, tmp_path, capsys, fmt, name):
    model_dir = corpus["root"] / "m"
    out = tmp_path / name
    assert main(["extract-G", "--model", str(model_dir), "--data", corpus["data"], "--samples", "7",
                 "--batch-size", "3", "--context-length", "24", "--out", str(out),
                 "--format", fmt]) == 0
    capsys.readouterr()
    model = load_model(model_dir)
    chunks = data_chunks(corpus["data"], corpus["tok"], 24, 7)
    per_chunk = [torch.stack(infer_G_LM(model, row[None])) for row in torch.from_numpy(chunks.rows(range(7)))]
    mean = torch.stack(per_chunk).mean(dim=0)                    # [L, 1, H, dk, dk]
    got = torch.stack(load_G_LM(out))
    assert_same(got, mean, "batches of 3 against one chunk at a time")  # float32: 1e-4
    prompts = [[17, 5, 99], [42, 7, 280, 9]]
    want = generate(model, prompts, 10, temperature=0, eos_id=-1, G_LM=list(mean))
    assert main(["generate", "--model", str(model_dir), "--ids", "17,5,99", "--ids", "42,7,280,9",
                 "--max-new-tokens", "10", "--temperature", "0", "--eos-id", "-1",
                 "--G-LM", str(out), "--json"]) == 0
    assert [r["ids"] for r in json.loads(capsys.readouterr().out)] == want
    # the file also makes a v510G model (the v510Gi ablation)
    g_model = PLDRModel(CONFIG.replace(variant="v510G"), G_LM=load_G_LM(out))
    assert_same(g_model.decoder.dec_layers[1].mha1.G_LM, got[1, 0])
    if fmt == "original":  # the release's format: a plain pickle of L tensors [1, H, dk, dk]
        with open(out, "rb") as f:
            layers = pickle.load(f)
        assert isinstance(layers, list) and len(layers) == 2
        assert all(t.shape == (1, 2, 16, 16) and t.dtype == torch.float32 for t in layers)
    else:
        A_LM, _ = load_G_LM_pairs(out)
        assert A_LM is not None and A_LM[0].shape == (1, 2, 16, 16)


@pytest.mark.parity
def test_extract_G_streams_any_batch_size_to_the_same_mean(corpus):
    model = load_model(corpus["root"] / "m").double()  # an exact property: float64 at 1e-10
    chunks = data_chunks(corpus["data"], corpus["tok"], 20, 6)
    one = extract_G_LM(model, chunk_batches(chunks, 1))
    four = extract_G_LM(model, chunk_batches(chunks, 4))
    assert one.samples == four.samples == 6
    assert_same(one.G_LM, four.G_LM, "G_LM mean")
    assert_same(one.G_LM_std, four.G_LM_std, "G_LM std")


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--out", "{tmp}/o"], "at least one --text"),
    (["inspect", "--ids", "5,x", "--out", "{tmp}/o"], "comma-separated"),
    (["inspect", "--ids", "5,6", "--out", "{tmp}/o", "--layers", "7"], "not a layer"),
    (["inspect", "--ids", "5,6", "--out", "{tmp}/o", "--layers", "a"], "--layers expects"),
    (["inspect", "--ids", "5,999", "--out", "{tmp}/o"], "outside the vocabulary"),
    (["extract-G", "--data", "{data}", "--samples", "100000", "--out", "{tmp}/g.safetensors"],
     "lower --samples"),
    (["extract-G", "--data", "{data}", "--samples", "2", "--out", "{tmp}/g.pt"], "*.safetensors"),
    (["extract-G", "--data", "{data}", "--samples", "0", "--out", "{tmp}/g.safetensors"],
     "at least 1"),
    (["extract-G", "--data", "{tmp}/none.txt", "--samples", "2", "--out", "{tmp}/g.safetensors"],
     "none.txt"),
    (["extract-G", "--data", "{data}", "--samples", "2", "--context-length", "4000",
      "--out", "{tmp}/g.safetensors"], "--context-length"),
])
def test_bad_input_is_one_error_line(corpus, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=corpus["data"]) for a in argv]
    argv[1:1] = ["--model", str(corpus["root"] / "m")]
    assert main(argv) == 2
    assert message in one_error_line(capsys)


def test_inspect_without_pictures_writes_the_report_only(corpus, tmp_path, capsys):
    out = tmp_path / "np"
    assert main(["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7", "--out",
                 str(out), "--no-pictures"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["layers"][0]["G_LM_rmse"] == 0  # one input: nothing to differ from


def test_inspect_names_its_report_as_a_clean_path(corpus, tmp_path, capsys):
    out = tmp_path / "np"
    assert main(["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7", "--out",
                 str(out) + "/", "--no-pictures"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out / 'report.json'}"


def test_extract_G_reports_are_named_after_their_file_so_two_formats_keep_both(corpus, tmp_path, capsys):
    common = ["extract-G", "--model", str(corpus["root"] / "m"), "--data", corpus["data"],
              "--samples", "3", "--context-length", "12"]
    assert main(common + ["--out", str(tmp_path / "G.safetensors")]) == 0
    assert main(common + ["--out", str(tmp_path / "G.pkl"), "--format", "original"]) == 0
    assert "G.pkl.report.json" in capsys.readouterr().out
    for name, fmt in (("G.safetensors", "safetensors"), ("G.pkl", "original")):
        report = json.loads((tmp_path / f"{name}.report.json").read_text())
        assert report["format"] == fmt and report["file"] == str(tmp_path / name)


def test_inspect_into_an_earlier_inspect_folder_replaces_it_as_a_whole(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    model = ["inspect", "--model", str(corpus["root"] / "m")]
    assert main(model + ["--ids", "5,6,7", "--ids", "8,9,10", "--out", str(out)]) == 0
    assert len(list(out.glob("input1_*.png"))) == 2
    assert main(model + ["--ids", "5,6,7", "--layers", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    pictures = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert pictures == ["G_LM_spectrum.png", "G_LM_spread.png", "input0_layer1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(pictures + ["index.html", "report.json"])
    assert [L["layer"] for L in report["layers"]] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_inspect_refuses_a_folder_that_is_not_an_earlier_inspect_output(corpus, tmp_path, capsys):
    model = ["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7", "--no-pictures"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(model + ["--out", str(busy)]) == 2
    assert "notes.txt" in one_error_line(capsys)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # an earlier inspect output with a file of the user's beside it is not replaced either
    out = tmp_path / "out"
    assert main(model + ["--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(model + ["--out", str(out)]) == 2
    assert "notes.txt" in one_error_line(capsys) and (out / "notes.txt").read_text() == "mine"


def test_inspect_dpi_sets_the_picture_size_and_the_default_is_150(corpus, tmp_path, capsys):
    from matplotlib.image import imread

    widths = {}
    for dpi in (None, "75"):
        out = tmp_path / f"dpi{dpi}"
        assert main(["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7",
                     "--out", str(out)] + (["--dpi", dpi] if dpi else [])) == 0
        widths[dpi] = {name: imread(out / name).shape[1]
                       for name in ("G_LM_spectrum.png", "input0_layer0.png")}
    for name, width in widths[None].items():
        assert abs(width - 2 * widths["75"][name]) <= 2, (name, widths)
    # the spectrum figure is 2.6 inches per layer + 0.6: at 150 DPI, 870 pixels wide
    assert abs(widths[None]["G_LM_spectrum.png"] - 870) <= 2


@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_inspect_format_writes_every_picture_in_that_format(corpus, tmp_path, capsys, fmt, magic):
    out = tmp_path / fmt
    assert main(["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7",
                 "--out", str(out), "--format", fmt]) == 0
    pictures = sorted(p.name for p in out.iterdir() if p.name not in ("report.json", "index.html"))
    assert pictures == sorted(f"{n}.{fmt}" for n in
                              ("G_LM_spectrum", "G_LM_spread", "input0_layer0", "input0_layer1"))
    for name in pictures:
        assert (out / name).read_bytes().startswith(magic)
    page = (out / "index.html").read_text()
    assert sorted(set(re.findall(r'(?:src|href|data)="([^"]+)"', page))) == pictures


def test_every_plot_with_several_lines_has_a_legend_naming_them():
    from pldr.analysis import plots
    from pldr.analysis.collect import collect
    from pldr.analysis.report import invariance, spectra

    torch.manual_seed(0)
    model = PLDRModel(CONFIG.replace(num_heads=4)).double().eval()
    items = collect(model, [[5, 6, 7, 8], [9, 10, 11]])
    G = torch.stack([it.G_LM for it in items])                    # [N, L, H, dk, dk]
    inv = invariance(G)
    figures = [plots.spectrum_figure(spectra(G).singular, [0, 1]),
               plots.spread_figure(inv.pairwise, inv.to_mean, ["a", "b"], [0, 1])]
    kinds = items[0].kinds()
    figures.append(plots.heatmaps_figure({k: t[0] for k, t in kinds.items()},
                                         {k: plots.colour_limits([t[0]]) for k, t in kinds.items()},
                                         "layer 0"))
    several = 0
    for fig in figures:
        legend_texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
        for ax in fig.axes:
            lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            if len(ax.get_lines()) > 1:
                several += 1
                assert len(lines) == len(ax.get_lines()), "every line is labelled"
                texts = legend_texts + ([t.get_text() for t in ax.get_legend().get_texts()]
                                        if ax.get_legend() else [])
                assert {line.get_label() for line in lines} <= set(texts)
    assert several == 2  # the spectrum's two layers, each a line per head
    assert sorted(t.get_text() for t in figures[0].legends[0].get_texts()) == \
        ["head 0", "head 1", "head 2", "head 3"]


def test_a_bad_dpi_names_the_parameter_in_python_and_the_flag_on_the_command_line(
        corpus, tmp_path, capsys):
    from pldr.analysis import inspect_model
    from pldr.errors import PLDRError

    model = load_model(corpus["root"] / "m")
    out = tmp_path / "o"
    with pytest.raises(PLDRError) as e:
        inspect_model(model, [[5, 6, 7]], out, pictures=False, dpi=10)
    assert str(e.value) == "`dpi` must be a whole number in 30..600, got 10"
    assert e.value.param == "dpi"
    assert main(["inspect", "--model", str(corpus["root"] / "m"), "--ids", "5,6,7", "--out",
                 str(out), "--no-pictures", "--dpi", "10"]) == 2
    assert one_error_line(capsys) == "error: --dpi must be a whole number in 30..600, got 10"
    assert not out.exists()


def test_too_few_chunks_names_samples_in_python_and_its_flag_on_the_command_line(
        corpus, tmp_path, capsys):
    from pldr.errors import DataError

    with pytest.raises(DataError, match=r"; lower `samples` or `context_length`$") as e:
        data_chunks(corpus["data"], corpus["tok"], 20, 100000)
    assert e.value.param == "samples"
    out = tmp_path / "g.safetensors"
    assert main(["extract-G", "--model", str(corpus["root"] / "m"), "--data", corpus["data"],
                 "--samples", "100000", "--context-length", "20", "--out", str(out)]) == 2
    assert one_error_line(capsys).endswith("; lower --samples or --context-length")
    assert not out.exists()
