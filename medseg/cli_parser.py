"""The command line's arguments: every subcommand and its options, and nothing they do
(``medseg.cli`` runs the subcommand ``args.command`` names)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its options; ``args.command`` names the one given."""
    parser = argparse.ArgumentParser(
        prog="medseg", description="Medical-image segmentation: train U-Nets, write masks, score them."
    )
    from medseg._version import __version__

    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override a config value (repeatable)",
    }

    p = sub.add_parser(
        "demo", help="train on the bundled heart data, predict and evaluate (2-7 min on 2 CPU cores)"
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        default="medseg_demo",
        help="folder for the demo's results (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, help="epochs of 25 steps to train (default: medseg.demo.DEMO_EPOCHS, 20)"
    )
    p.add_argument("--set", **overrides)

    p = sub.add_parser("train", help="train a model on a dataset folder")
    _run_arguments(p, overrides, "dataset folder (dataset.json, or imagesTr/ + labelsTr/) or CSV")
    p.add_argument("--fold", type=int, help="cross-validation: train fold K, in OUTPUT/fold_K")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights (medseg pretrain's, or another run's): its network "
        "and plan are used, every matching weight but the output head is loaded",
    )
    p.add_argument(
        "--init-parts",
        default="encoder",
        choices=["encoder", "all", "decoder"],
        help="which weights --init loads (default: %(default)s)",
    )
    p.add_argument(
        "--unlabeled",
        metavar="DIR",
        help="images without labels to learn from too (mean-teacher consistency): a folder, a CSV "
        "with an 'image' column, or 'dataset' for the dataset's imagesUn/ (train.unlabeled)",
    )
    p.add_argument(
        "--pseudo-labels-from",
        metavar="MODEL",
        help="self-training instead: this trained model (a run folder or checkpoint) labels the "
        "--unlabeled images first, and the run learns from its masks as from labels (train.pseudo_labels)",
    )

    p = sub.add_parser(
        "pretrain",
        help="diffusion-denoising pretraining on images, labelled or not (then train --init)",
        description="Train a U-Net to predict the noise added to images (DDPM), on every image of the "
        "dataset: training, test and unlabelled (imagesUn/, or dataset.json's 'unlabeled'). Its "
        "checkpoint starts a segmentation run: medseg train --init RUN_DIR/last.pt.",
    )
    _run_arguments(p, overrides, "dataset folder (any layout train reads, plus imagesUn/) or CSV")

    p = sub.add_parser("plan", help="plan spacing, patch size, pooling and normalisation from a dataset")
    p.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    p.add_argument("--config", help="YAML config (its model depth and any fixed values are respected)")
    p.add_argument("--set", **overrides)
    _modality_argument(p)
    p.add_argument("-o", "--out", "--output", dest="out", help="also save the plan as YAML here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--device", help="plan for training on this device: auto, cpu, cuda, cuda:N or mps (train.device)"
    )

    p = sub.add_parser(
        "predict",
        help="segment files, folders, lists or DICOM series with a trained checkpoint",
        description="Segment every case of a file, a folder (searched recursively; its sub-folders "
        "are mirrored in the output), a .csv/.txt list, or DICOM series. Writes the masks, "
        "labels.json, predictions.csv and run.json. Exit status: 0 all cases written or already "
        "done, 1 some cases failed, 2 usage or fatal error, 3 a crash (a bug: its traceback is "
        "printed), 130 interrupted.",
    )
    p.add_argument(
        "-m",
        "--model",
        required=True,
        action="append",
        help="checkpoint file, run folder (its best.pt) or cross-validation folder (every fold_K/best.pt); "
        "repeat it to average several models' probabilities (an ensemble)",
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        help="an image file, a folder of image files and DICOM series (searched recursively), "
        "a .csv (column 'image', optionally 'id') or .txt list of files, or a DICOMweb server, "
        "dicomweb://HOST:PORT/PATH (dicomwebs:// for TLS; needs medseg[pacs]): its series are "
        "segmented and a DICOM-SEG of each is stored back",
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        required=True,
        help="folder for the masks (not the input folder nor inside it)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="which checkpoint of a run folder: best (by validation) or last (default: %(default)s)",
    )
    p.add_argument(
        "-f",
        "--fold",
        type=int,
        nargs="+",
        metavar="K",
        help="of a cross-validation folder, only these folds (e.g. -f 0 1 2; default: every fold)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        help="of neighbouring sliding windows, 0 to below 1 (nnU-Net's step size is 1 - overlap; "
        "default: the model's infer.overlap, 0.25)",
    )
    _threads_argument(p)
    p.add_argument(
        "--format",
        default="same",
        choices=["same", "nifti", "nrrd", "mha", "dicom-seg"],
        help="mask format: same as the input (NIfTI for DICOM series), nifti, nrrd, mha, "
        "or dicom-seg (DICOM inputs; needs medseg[dicom])",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo masks already in the output folder; without it, masks made by this checkpoint "
        "with the same options are kept and any other mask stops the run",
    )
    p.add_argument("--shard", metavar="I/N", help="take the I-th of N equal shares of the cases (0-based)")
    p.add_argument(
        "--statistics", action="store_true", help="also report the mean image intensity inside each label"
    )
    p.add_argument(
        "--preview", action="store_true", help="also draw a PNG overlay per case in OUTPUT/previews"
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="flip test-time augmentation along the axes the model was trained to mirror "
        "(default: the model's infer.tta: on for models trained with mirroring, unless training "
        "found it raised their validation Dice by less than 0.002)",
    )
    p.add_argument(
        "--tta-mirrors",
        choices=["auto", "all", "single"],
        help="which mirrors TTA passes: all combinations (2^axes passes), single (1 + axes: one axis "
        "at a time), or auto: single for 3 axes, all for fewer (default: the model's infer.tta_mirrors)",
    )
    p.add_argument(
        "--keep-largest",
        metavar="LABELS",
        help="keep only the largest connected piece of: all, none, labels like 1,3, or auto (the labels "
        "where training's validation found it helped; default: the model's infer.keep_largest)",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write CASE_probabilities: the class probabilities, one component per class",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write CASE_uncertainty: where the TTA passes or ensemble models disagree (0..1)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where the CPU or GPU computes it natively, else fp32 (default: the model's "
        "train.precision)",
    )
    p.add_argument(
        "--runtime",
        choices=["auto", "openvino", "onnxruntime"],
        default="auto",
        help="for a model folder from medseg export: auto is OpenVINO where installed, else ONNX Runtime",
    )
    p.add_argument("--study", metavar="UID", help="with -i dicomweb://...: segment this study's image series")
    p.add_argument("--series", metavar="UID", help="with -i dicomweb://...: only this series")
    p.add_argument(
        "--query",
        metavar="FILTERS",
        help="with -i dicomweb://...: QIDO-RS filters selecting the series, "
        'like "Modality=MR&StudyDate=20260101-"',
    )
    p.add_argument(
        "--store-to",
        metavar="ADDRESS",
        help="with -i dicomweb://...: store the DICOM-SEGs on this DICOMweb server (default: the source)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors, warnings and the summary")

    p = sub.add_parser(
        "export",
        help="write a model folder for CPU servers: the network as ONNX and what prediction needs",
        description="Write the network of a checkpoint as ONNX (needs medseg[export]) beside its plan, "
        "labels and settings. medseg predict -m FOLDER runs it with OpenVINO or ONNX Runtime "
        "(medseg[deploy]) on the CPU, with every option predict has. Exit status: 0 written, 2 usage "
        "or fatal error, 3 a crash (a bug: its traceback is printed), 130 interrupted.",
    )
    p.add_argument("-m", "--model", required=True, help="checkpoint file or run folder (its best.pt)")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, help="the model folder to write")
    p.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="which checkpoint of a run folder (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an exported model in the folder")
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantize to int8 for OpenVINO (needs medseg[int8]); refused when its Dice "
        "falls more than --max-dice-drop below fp32's on validation cases",
    )
    p.add_argument(
        "--calibrate",
        metavar="DIR",
        help="with --int8: images to calibrate on (default: 8 of the run's training images)",
    )
    p.add_argument(
        "--validate",
        metavar="DIR",
        help="with --int8: a labelled dataset to check Dice on (default: the run's validation cases)",
    )
    p.add_argument(
        "--max-dice-drop",
        type=float,
        metavar="D",
        help="with --int8: the most int8's mean Dice may fall below fp32's (default: 0.005)",
    )
    _threads_argument(p)

    p = sub.add_parser(
        "listen",
        help="a DICOM node: receive series by C-STORE, segment each, send its DICOM-SEG on",
        description="Receive images by C-STORE (needs medseg[pacs]), segment each series once no image "
        "of it arrived for the quiet period, and send its DICOM-SEG by C-STORE to --send-to. What "
        "arrives is written to OUTPUT.spool first, so a restart finishes the work. Runs until stopped "
        "(Ctrl-C or SIGTERM).",
    )
    p.add_argument(
        "-m", "--model", required=True, help="checkpoint file, run folder or exported model folder"
    )
    p.add_argument(
        "-o", "--output", "--out", dest="output", required=True, help="folder for the SEGs and reports"
    )
    p.add_argument("--send-to", required=True, metavar="AE@HOST:PORT", help="where the DICOM-SEGs go")
    p.add_argument("--ae-title", default="MEDSEG", help="this node's AE title (default: %(default)s)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=11112, help="(default: %(default)s)")
    p.add_argument(
        "--allow-ae",
        action="append",
        metavar="AE",
        help="a calling AE title to accept (repeatable; default: only --send-to's)",
    )
    p.add_argument(
        "--quiet-period",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds without a new image after which a series is complete (default: %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--tls-cert", metavar="PEM", help="listen over TLS with this certificate (and --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="certificates to trust: the destination's is checked against them (--send-tls), and "
        "callers over TLS must show one they signed",
    )
    p.add_argument("--send-tls", action="store_true", help="send the SEGs over TLS")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="as for predict")
    p.add_argument("--tta-mirrors", choices=["auto", "all", "single"], help="as for predict")
    p.add_argument("--keep-largest", metavar="LABELS", help="as for predict")
    p.add_argument(
        "--runtime", choices=["auto", "openvino", "onnxruntime"], default="auto", help="as for predict"
    )
    _threads_argument(p)

    p = sub.add_parser(
        "evaluate", help="Dice, IoU, HD95, ASSD and surface Dice per case and class against references"
    )
    p.add_argument("--pred", required=True, help="folder of predicted masks (sub-folders included)")
    p.add_argument("--ref", required=True, help="folder of reference masks (matched by case name)")
    p.add_argument(
        "-o", "--out", "--output", dest="out", help="folder for metrics.csv and summary.json (default: PRED)"
    )
    _scoring_arguments(p)

    p = sub.add_parser("report", help="QC report: a picture per case and index.html, worst case first")
    p.add_argument("--pred", required=True, help="folder of predicted masks (sub-folders included)")
    p.add_argument("--images", help="folder of the scans the masks were predicted from (matched by name)")
    p.add_argument("--ref", help="folder of reference masks: score the cases and draw both contours")
    p.add_argument(
        "-o",
        "--out",
        "--output",
        dest="out",
        required=True,
        help="folder for index.html, the pictures and the metrics",
    )
    _scoring_arguments(p)
    return parser


def _scoring_arguments(p: argparse.ArgumentParser) -> None:
    """The options evaluate and report share."""
    p.add_argument(
        "--labels",
        help="JSON with class names (a dataset.json, or a map); default: PRED/labels.json from predict",
    )
    p.add_argument(
        "--tolerance",
        action="append",
        metavar="[CLASS=]MM",
        help="surface-Dice tolerance in mm, for every class or one (repeatable; default: 2)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in the output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _run_arguments(p: argparse.ArgumentParser, overrides: dict, data_help: str) -> None:
    """The options every training run takes (train and pretrain)."""
    p.add_argument("-d", "--data", help=data_help)
    p.add_argument(
        "-o", "--output", "--out", dest="output", help="run folder for checkpoints, metrics and pictures"
    )
    p.add_argument("--config", help="YAML config (default: the built-in heart settings; see configs/)")
    p.add_argument("--set", **overrides)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    _modality_argument(p)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (train.device; default: auto)")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="train this long (train.max_time)")
    p.add_argument(
        "--epochs", type=int, help="train this many epochs of train.iters_per_epoch steps (train.epochs)"
    )
    p.add_argument("--seed", type=int, help="the run's random seed (train.seed)")
    _threads_argument(p)


def _threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads to compute with (default: one per core)")


def _modality_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--modality",
        type=str.upper,
        help="MRI or CT (CT gets Hounsfield-unit normalisation); default: dataset.json's, else "
        "judged from the images, with a warning (data.modality)",
    )
