"""The `vlp` command: data, tokenizer, train, eval, caption, convert, report."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="vlp: vision-language pretraining (CLIP, ALBEF, BLIP, ...) from data to eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate or prepare data sets.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train text tokenizers.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
index_app = typer.Typer(help="Index an image collection and search it by text or by image.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    train: Annotated[int, typer.Option(help="Training images (1 web-style caption each).")] = 50_000,
    val: Annotated[int, typer.Option(help="Validation images (5 captions each).")] = 1_000,
    test: Annotated[int, typer.Option(help="Test images for retrieval and the swap probe.")] = 1_000,
    clean: Annotated[int, typer.Option(help="Clean 'human' subset for fine-tuning.")] = 2_000,
    classify: Annotated[int, typer.Option(help="Single-object images for zero-shot classification.")] = 1_000,
    compositional: Annotated[int, typer.Option(help="Images with held-out colour+shape pairs.")] = 1_000,
    noise: Annotated[float, typer.Option(help="Fraction of corrupted training captions.")] = 0.0,
    seed: Annotated[int, typer.Option(help="World seed: sample i is a pure function of (seed, split, i).")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    fmt: Annotated[str, typer.Option("--format", help="wds (webdataset shards), jsonl or csv.")] = "wds",
    vocab_size: Annotated[int, typer.Option(help="Size of the tokenizer trained on the captions.")] = 4096,
) -> None:
    """Write the synthetic shapes world (docs/data.md) and a tokenizer trained on its captions."""
    from vlp.data.formats import open_dataset
    from vlp.data.shapes import PROMPT_TEMPLATES, write_shapes
    from vlp.data.tokenizer import Tokenizer

    counts = {
        "train": train,
        "val": val,
        "test": test,
        "clean": clean,
        "classify": classify,
        "compositional": compositional,
    }
    write_shapes(out, counts, seed=seed, image_size=image_size, noise=noise, format=fmt)
    corpus = open_dataset(out, split="train")
    texts = [c for i in range(len(corpus)) for c in corpus.captions(i)] + PROMPT_TEMPLATES
    Tokenizer.train(texts, vocab_size=vocab_size).save(out / "tokenizer.json")
    typer.echo(f"wrote {sum(counts.values())} samples and tokenizer.json to {out}")


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[Path, typer.Argument(help="A data set (any supported format) whose captions to use.")],
    out: Annotated[Path, typer.Option(help="Where to write tokenizer.json (file or directory).")],
    split: Annotated[str, typer.Option(help="Split to read captions from.")] = "train",
    vocab_size: Annotated[int, typer.Option(help="Maximum vocabulary size.")] = 4096,
) -> None:
    """Train a WordPiece tokenizer (with vlp's special tokens) on a data set's captions."""
    from vlp.data.formats import open_dataset
    from vlp.data.tokenizer import Tokenizer

    dataset = open_dataset(data, split=split)
    tokenizer = Tokenizer.train((c for i in range(len(dataset)) for c in dataset.captions(i)), vocab_size)
    tokenizer.save(out)
    typer.echo(f"vocabulary of {tokenizer.vocab_size} tokens written to {out}")


@tokenizer_app.command("image")
def tokenizer_image(
    data: Annotated[Path, typer.Argument(help="A data set whose images to use.")],
    out: Annotated[Path, typer.Option(help="Codebook file to write (.safetensors).")],
    split: Annotated[str, typer.Option(help="Split to read images from.")] = "train",
    images: Annotated[int, typer.Option(help="Images to fit the codebook on.")] = 2000,
    codebook: Annotated[int, typer.Option(help="Number of visual tokens.")] = 256,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels (the model's).")] = 8,
    image_size: Annotated[int, typer.Option(help="Image side the model sees.")] = 64,
) -> None:
    """Fit the visual-token codebook for masked image modeling (k-means over patches; see
    vlp.nn.image_tokenizer for how it differs from BEiT v2's VQ-KD)."""
    import torch

    from vlp.data.formats import open_dataset
    from vlp.data.sample import Skipped
    from vlp.data.transforms import eval_transform
    from vlp.nn.image_tokenizer import ImageTokenizer

    dataset, transform = open_dataset(data, split=split), eval_transform(image_size)
    samples = (dataset[i] for i in range(min(images, len(dataset))))
    batch = torch.stack([transform(s.image) for s in samples if not isinstance(s, Skipped)])
    tokenizer = ImageTokenizer(codebook, patch_size)
    error = tokenizer.fit(batch)
    tokenizer.save(out)
    typer.echo(
        f"wrote {out}: {codebook} visual tokens from {len(batch)} images (mean squared patch distance {error:.4f})"
    )


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe name, e.g. clip.")],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="Config overrides as section.key=value, e.g. train.lr=1e-3 model.embed_dim=64."),
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: configs/RECIPE/tiny.yaml).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Data set directory (overrides data.path).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/latest"),
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (overrides train.steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Per-process batch size.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue exactly from the run's newest checkpoint, with the run's own config.yaml "
            "(overrides that would change the result are refused; see --allow-changes)."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Start over in an --out that already holds a run, deleting that run's checkpoints, "
            "metrics, config and tokenizer."
        ),
    ] = False,
    allow_changes: Annotated[
        bool,
        typer.Option(
            help="--resume with overrides that make the run differ from an unbroken one (e.g. more "
            "train.steps, another learning rate)."
        ),
    ] = False,
    init: Annotated[
        Optional[Path],
        typer.Option(
            help="Start from the weights (and tokenizer) of this pretrained run or checkpoint "
            "(fine-tuning); weights the new recipe lacks or adds are listed."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Stop at the first unreadable sample (naming its file) instead of skipping it.")
    ] = False,
    lm: Annotated[
        Optional[Path],
        typer.Option(help="blip2_stage2: the frozen language model, a transformers directory (overrides model.lm)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a recipe. Works alone or under `torchrun --nproc_per_node N` (DDP).

    --out must be a new directory, or one holding a run to --resume (or to --overwrite); one
    process at a time trains into it.
    """
    from vlp.train.trainer import train_run

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    flags = {
        "data.path": data,
        "train.steps": steps,
        "data.batch_size": batch_size,
        "train.seed": seed,
        "data.strict": strict or None,
        "model.lm": lm,
    }
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    values = train_run(
        recipe,
        out,
        config,
        extra + list(overrides or []),
        init,
        resume,
        progress,
        overwrite=overwrite,
        allow_changes=allow_changes,
    )
    if values:
        typer.echo(f"done: step {values['step']}, loss {values['loss']:.4f}; run in {out}")


@app.command("eval")
def evaluate(
    run: Annotated[
        Path,
        typer.Argument(
            help="Run directory (or one of its checkpoints), or a transformers/open_clip checkpoint directory."
        ),
    ],
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Data set in any format vlp reads (shards, JSONL, CSV, COCO-Karpathy JSON, an image "
            "folder, VQAv2), or the shapes world (default: the run's data.path)."
        ),
    ] = None,
    tasks: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated subset of zeroshot,retrieval,probe,caption,vqa "
            "(default: every task the recipe supports that the data allows)."
        ),
    ] = None,
    split: Annotated[
        Optional[str],
        typer.Option(help="Split of --data to evaluate on (default: the data itself, else 'test')."),
    ] = None,
    classes: Annotated[
        Optional[str],
        typer.Option(
            help="Zero-shot class names: a file (one per line, line i = class id i) or a comma-separated "
            "list (default: the data's classnames.txt or class folders)."
        ),
    ] = None,
    templates: Annotated[
        Optional[Path],
        typer.Option(help="Zero-shot prompt templates, one per line with {} or {c} for the class name."),
    ] = None,
    label_key: Annotated[
        Optional[str], typer.Option(help="The label column of a CSV or JSONL --data (zero-shot classification).")
    ] = None,
    image_root: Annotated[
        Optional[Path],
        typer.Option(help="Folder the images listed by --data lie in (default: beside the listing file)."),
    ] = None,
    decoding: Annotated[
        str, typer.Option(help="Caption decoding: beam (3 beams), greedy or nucleus (top-p 0.9).")
    ] = "beam",
    report: Annotated[bool, typer.Option(help="Also write RUN/report.html.")] = True,
    k_test: Annotated[
        int, typer.Option(help="Recipes with an ITM head: re-rank each query's ITC top-k by ITM score.")
    ] = 16,
) -> None:
    """Evaluate a model on a data set; writes eval.json (and report.html) beside the model.

    Examples: `vlp eval runs/clip` (the run's own data), `vlp eval runs/clip --data imagenet/val
    --classes classnames.txt` (zero-shot top-1/top-5/mean per-class recall), `vlp eval hf-clip
    --data dataset_coco.json --tasks retrieval` (Karpathy's test split), `vlp eval runs/blip_vqa
    --data vqav2/` (official VQA accuracy).
    """
    import vlp
    from vlp.data.formats import read_class_names, read_templates
    from vlp.eval.report import write_report
    from vlp.eval.results import console, results_table
    from vlp.eval.run import evaluate as run_eval
    from vlp.interop.pretrained import is_pretrained_dir
    from vlp.train.checkpoint import run_of

    model = vlp.load(run)
    if data is None and model.run_config is None:
        raise typer.BadParameter(f"{run} is not a vlp run: pass --data")
    run_dir = run if is_pretrained_dir(run) else run_of(run)
    results = run_eval(
        model,
        data or Path(model.run_config.data.path),
        run_dir,
        tasks=tasks and [t.strip() for t in tasks.split(",") if t.strip()],
        k_test=k_test,
        split=split,
        classes=classes and (read_class_names(Path(classes)) if Path(classes).is_file() else classes.split(",")),
        templates=templates and read_templates(templates),
        label_key=label_key,
        image_root=image_root,
        decoding=decoding_options(decoding),
    )
    console.print(results_table(results))
    if report:
        typer.echo(f"report: {write_report(run_dir)}")


def decoding_options(method: str) -> dict:
    """The decoding settings behind a `--decoding` choice (BLIP's evaluation uses beam 3)."""
    from vlp.eval.captioning import decoding_preset

    try:
        return decoding_preset(method)
    except ValueError as err:
        raise typer.BadParameter(f"--{err}") from None


PRECISION_HELP = "auto (bf16 where this machine runs it measurably faster), fp32 or bf16"
IMAGES_HELP = "Image files, folders of images (walked recursively) or data sets in any format vlp reads."


@app.command()
def caption(
    run: Annotated[Path, typer.Argument(help="A run or checkpoint of a recipe with a decoder (BLIP, CoCa, BLIP-2).")],
    images: Annotated[list[Path], typer.Argument(help=IMAGES_HELP)],
    decoding: Annotated[str, typer.Option(help="beam (3 beams), greedy or nucleus (top-p 0.9).")] = "beam",
    prompt: Annotated[Optional[str], typer.Option(help="Text the caption starts with (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images captioned together.")] = 32,
    out: Annotated[Optional[Path], typer.Option(help='Also write {"path", "caption"} JSON lines here.')] = None,
) -> None:
    """Print a caption for each image ("path<TAB>caption"); an image that cannot be read is
    skipped with a line on stderr. Exits non-zero only when no image could be read."""
    import vlp
    from vlp.apps.ability import require
    from vlp.data.transforms import model_images

    model = vlp.load(run)
    require(model, "caption")
    options = decoding_options(decoding)

    def work(batch: list) -> list[str]:
        return model.caption(model_images(model, batch), prompt=prompt, **options)

    _for_each_image(images, work, batch_size, out, "caption", str)


@app.command()
def classify(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A run or checkpoint of an aligned recipe.")],
    images: Annotated[list[Path], typer.Argument(help=IMAGES_HELP)],
    labels: Annotated[Optional[str], typer.Option(help='Comma-separated labels, e.g. "cat,dog,red car".')] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="Labels, one per line.")] = None,
    templates: Annotated[
        Optional[Path], typer.Option(help="Prompt templates, one per line with {} for the label (default: vlp's).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels shown per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images classified together.")] = 64,
    out: Annotated[
        Optional[Path], typer.Option(help='Also write {"path", "labels": [[label, probability], ...]} JSON lines here.')
    ] = None,
    precision: Annotated[str, typer.Option(help=f"The image encoder's: {PRECISION_HELP}.")] = "auto",
) -> None:
    """Label images with words you choose (zero-shot, CLIP Sec. 3.1.4): prints each image's most
    probable labels with their probabilities."""
    import vlp
    from vlp.apps.classify import classifier
    from vlp.data.formats import read_class_names, read_templates

    if (labels is None) == (labels_file is None):
        raise typer.BadParameter("give --labels or --labels-file (one of them)")
    names = read_class_names(labels_file) if labels_file else [x.strip() for x in labels.split(",") if x.strip()]
    model = vlp.load(model_path)
    work = classifier(model, names, templates and read_templates(templates), top_k, precision)

    def show(result: list) -> str:
        return ", ".join(f"{label} {probability:.3f}" for label, probability in result)

    _for_each_image(images, work, batch_size, out, "labels", show)


@app.command()
def ask(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A run of a VQA recipe (BLIP VQA, BLIP-2).")],
    image: Annotated[Path, typer.Argument(help="An image file.")],
    question: Annotated[str, typer.Argument(help='A question about the image, e.g. "what colour is the square?"')],
) -> None:
    """Answer a question about an image."""
    import vlp
    from vlp.apps.ability import require
    from vlp.data.formats import load_image
    from vlp.data.transforms import model_images

    model = vlp.load(model_path)
    require(model, "ask")
    typer.echo(model.answer_texts(model_images(model, [load_image(image)]), [question])[0])


@index_app.command("build")
def index_build(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A run or checkpoint of an aligned recipe.")],
    paths: Annotated[
        list[Path],
        typer.Argument(help="Image files, folders (walked recursively) and data sets (their captions are kept)."),
    ],
    out: Annotated[Path, typer.Option(help="Index directory (created, or updated when it exists).")],
    batch_size: Annotated[int, typer.Option(help="Images embedded together.")] = 64,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Processes decoding images while the model embeds (default: the cores it leaves idle)."),
    ] = None,
    exact_limit: Annotated[int, typer.Option(help="Exact search up to this many images, HNSW above.")] = 100_000,
    precision: Annotated[str, typer.Option(help=f"{PRECISION_HELP}; an index keeps its first.")] = "auto",
) -> None:
    """Embed every image under PATHS into a faiss index with its metadata in SQLite. Re-running
    adds new files, re-embeds changed ones, drops deleted ones; a killed build resumes."""
    from rich.progress import Progress

    import vlp
    from vlp.apps.index import build

    model = vlp.load(model_path)
    with Progress(*Progress.get_default_columns(), transient=True) as bar:
        task = bar.add_task("index", total=None)
        info = build(
            model,
            paths,
            out,
            str(model_path),
            batch_size,
            workers,
            exact_limit,
            progress=lambda done, total: bar.update(task, advance=done, total=total),
            precision=precision,
        )
    for line in info["skipped"]:
        typer.echo(f"skipped {line}", err=True)
    recall = f", recall@10 {info['recall_at_10']:.3f} against exact" if "recall_at_10" in info else ""
    typer.echo(f"{out}: {info['count']} images, {info['kind']} search{recall}")


@index_app.command("search")
def index_search(
    index: Annotated[Path, typer.Argument(help="An index made by `vlp index build`.")],
    text: Annotated[Optional[str], typer.Argument(help='A description, e.g. "a red circle".')] = None,
    image: Annotated[Optional[Path], typer.Option(help="Search by this image instead of a text.")] = None,
    top_k: Annotated[int, typer.Option(help="Results shown.")] = 10,
    rerank: Annotated[Optional[str], typer.Option(help="itm: re-score the shortlist with the ITM head.")] = None,
    shortlist: Annotated[int, typer.Option(help="--rerank: how many of the best to re-score.")] = 50,
) -> None:
    """Print the best matching images, "score<TAB>path", best first (and "<TAB>caption" for
    images indexed from a data set with captions)."""
    from vlp.apps.index import Index
    from vlp.data.formats import load_image

    if (text is None) == (image is None):
        raise typer.BadParameter("give a text or --image (one of them)")
    if rerank not in (None, "itm"):
        raise typer.BadParameter(f"--rerank must be itm, got {rerank!r}")
    query = text if image is None else load_image(image)
    for hit in Index.open(index).search(query, top_k, rerank, shortlist):
        caption = f"\t{hit['caption']}" if hit["caption"] else ""
        typer.echo(f"{hit['score']:.4f}\t{hit['path']}{caption}")


@app.command()
def serve(
    index: Annotated[Path, typer.Argument(help="An index made by `vlp index build`.")],
    model: Annotated[
        Optional[str],
        typer.Option(
            help="The model that captions, labels and answers (default: the index's own); search uses the index's."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 shares the server with your network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image upload, in MB.")] = 10,
    max_in_flight: Annotated[
        int, typer.Option(help="API requests served at once; 32 more wait, the rest get 503.")
    ] = 8,
    max_batch: Annotated[int, typer.Option(help="Concurrent requests answered by one model call (1: none).")] = 16,
) -> None:
    """Serve a web page and a JSON API over an index: search it by text or by image; caption,
    label and ask about an uploaded image where the model can (docs/apps.md). API docs at /docs."""
    try:
        from vlp.apps.serve import Limits
        from vlp.apps.serve import serve as run
    except ImportError as err:
        extra = "search" if err.name == "faiss" else "serve"
        typer.echo(f"error: vlp serve needs {err.name}: pip install 'vlp[{extra}]'", err=True)
        raise typer.Exit(1) from None
    limits = Limits(max_upload_bytes=int(max_upload_mb * 2**20), max_in_flight=max_in_flight, max_batch=max_batch)
    typer.echo(f"serving {index} on http://{host}:{port} (API docs: /docs); Ctrl-C stops")
    run(index, model, host, port, limits)


def _for_each_image(paths: list[Path], work, batch_size: int, out: Path | None, key: str, show) -> None:
    """Run `work` over the images of `paths` in batches, print "path<TAB>show(result)" per image
    (and {"path", key: result} JSON lines to `out`), each unreadable image on stderr; exit 1 when
    no image could be read."""
    import json

    from vlp.apps.inputs import over_images

    def report(skip) -> None:
        typer.echo(f"skipped {skip.source}: {skip.reason}", err=True)

    done = 0
    with open(out, "w") if out else contextlib.nullcontext() as sink:
        for source, result in over_images(paths, work, batch_size, report):
            typer.echo(f"{source}\t{show(result)}")
            if sink:
                sink.write(json.dumps({"path": source, key: result}) + "\n")
            done += 1
    if not done:
        typer.echo("no image could be read", err=True)
        raise typer.Exit(1)


@app.command()
def convert(
    src: Annotated[
        str,
        typer.Argument(
            help="A vlp run, a transformers/open_clip checkpoint directory or a hub id (org/name, needs the network)."
        ),
    ],
    dst: Annotated[Path, typer.Argument(help="Output directory.")],
    to: Annotated[
        str,
        typer.Option(
            help="hf: a transformers checkpoint; open_clip: an open_clip directory (CLIP, SigLIP); "
            "vlp: a run that vlp eval, vlp caption and vlp train --init take."
        ),
    ] = "vlp",
    strict: Annotated[bool, typer.Option(help="Fail on checkpoint weights vlp cannot place.")] = True,
    task: Annotated[
        Optional[str],
        typer.Option(help="--to hf, BLIP with ITC+ITM+LM: retrieval or captioning (the transformers model to write)."),
    ] = None,
) -> None:
    """Convert a checkpoint between vlp, transformers and open_clip formats (docs/interop.md)."""
    import vlp

    if to not in ("hf", "open_clip", "vlp"):
        raise typer.BadParameter(f"--to must be hf, open_clip or vlp, got {to!r}")
    model = vlp.load(src, strict=strict)
    typer.echo(f"wrote {vlp.save(model, dst, format=to, task=task)} ({model.recipe}, {to} format)")


@app.command()
def capfilt(
    init: Annotated[Path, typer.Option(help="Pretrained BLIP run both models are fine-tuned from.")],
    data: Annotated[Path, typer.Option(help="The noisy data set to bootstrap (its train split).")],
    clean: Annotated[Path, typer.Option(help="Data set whose `clean` split fine-tunes captioner and filter.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Output directory: the data set (see --format), report.html, "
            "capfilt.json, captioner/ and filter/ runs."
        ),
    ],
    steps: Annotated[int, typer.Option(help="Fine-tuning steps of the captioner and of the filter.")] = 200,
    synthetic: Annotated[int, typer.Option(help="Synthetic captions sampled per image.")] = 1,
    method: Annotated[str, typer.Option(help="nucleus (top-p 0.9; the paper's choice) or beam (3 beams).")] = "nucleus",
    max_new_tokens: Annotated[
        int, typer.Option(help="Longest synthetic caption in tokens (capped at the captioner's context length).")
    ] = 30,
    threshold: Annotated[float, typer.Option(help="ITM match probability a caption needs to be kept.")] = 0.5,
    mode: Annotated[
        str,
        typer.Option(
            help="itm (BLIP's filter) or rank (BLIP-2: rank all candidates with --ranker and keep the best --keep)."
        ),
    ] = "itm",
    ranker: Annotated[
        Optional[Path], typer.Option(help="rank mode: a CLIP run (or checkpoint) scoring candidates.")
    ] = None,
    keep: Annotated[int, typer.Option(help="rank mode: captions kept per image.")] = 2,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N samples.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the caption sampling.")] = 0,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="jsonl (train.jsonl + images/) or wds (webdataset shards train/train-000000.tar, ...)."
        ),
    ] = "jsonl",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """CapFilt (BLIP Sec. 3.3): caption and filter a noisy data set into a cleaner one.

    Resumable: run the same command again after an interruption. Prints how many web captions
    were removed and synthetic ones added, and (with the shapes world's noise flags) the filter's
    precision and recall; out/report.html has the precision/recall curve.
    """
    from vlp.apps import capfilt as cf

    options = cf.CapFiltOptions(
        synthetic=synthetic,
        method=method,
        max_new_tokens=max_new_tokens,
        threshold=threshold,
        mode=mode,
        keep=keep,
        limit=limit,
        seed=seed,
    )
    try:
        cf.check_run(out, options, ranker, fmt)  # before any fine-tuning
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    stats, written = cf.run(
        init, data, clean, out, steps=steps, options=options, ranker=ranker, format=fmt, progress=progress
    )
    for line in cf.summary_lines(stats):
        typer.echo(line)
    typer.echo(f"data: {written}; report: {out / 'report.html'}")


@app.command("report")
def report(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """(Re)write RUN/report.html from the run's metrics and eval results."""
    from vlp.eval.report import write_report

    typer.echo(f"report: {write_report(run)}")


def main() -> None:
    """The `vlp` command. A user's mistake (bad data, config, run directory or path) ends with one
    line naming the file, field or option, and exit status 1; a bug still shows its traceback."""
    try:
        app()
    except Exception as err:
        if not _is_user_error(err):
            raise
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(1) from None


def _is_user_error(err: Exception) -> bool:
    from vlp.config import ConfigError
    from vlp.data.sample import DataError
    from vlp.train.checkpoint import CheckpointError
    from vlp.train.rundir import RunError

    return isinstance(err, (ConfigError, DataError, CheckpointError, RunError, FileNotFoundError))


if __name__ == "__main__":
    main()
