"""`sane-hf probe`: linear probes of SANE embeddings next to the s(W) and W baselines."""

from __future__ import annotations

from sane_hf.cli.common import add_window_arguments, check_sources, device_argument


def register(subparsers) -> None:
    """Add this module's command to the `sane-hf` parser."""
    parser = subparsers.add_parser(
        "probe",
        help="linear probes of SANE embeddings for model properties, next to s(W) and W baselines",
    )
    parser.add_argument("--model", required=True, help="SANE checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="zoo dataset folder or Hub id")
    parser.add_argument("--output-dir", help="write probe.json (and probe.png) here")
    parser.add_argument(
        "--properties",
        nargs="+",
        help="columns to predict (default: all numeric + categorical hyperparameters)",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=["s(W)", "W"], help="s(W) and/or W; none to skip"
    )
    parser.add_argument(
        "--max-raw-features", type=int, default=50_000, help="largest model for the W baseline"
    )
    parser.add_argument(
        "--layer-means", action="store_true", help="also probe per-layer mean latents"
    )
    parser.add_argument(
        "--all-features",
        action="store_true",
        help="probe every SANE feature set (mean, per-layer means, s(Z), SANE + s(W)); the table "
        "names the SANE set chosen on validation per property",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="scatter plots of predicted vs true (needs --output-dir)",
    )
    parser.add_argument(
        "--per-architecture-models",
        nargs="+",
        metavar="ARCH=MODEL",
        help="mixed zoos: SANEs of one architecture each, probed beside the universal one",
    )
    add_window_arguments(parser)
    parser.set_defaults(func=_run_probe)


def _run_probe(args) -> int:
    from sane_hf.downstream.features import HEAD_FEATURE_SETS
    from sane_hf.recipes.experiments import probe_pretrained
    from sane_hf.zoo.mixed import is_mixed_dataset

    check_sources({"--model": args.model, "--dataset": args.dataset})
    if is_mixed_dataset(args.dataset):
        return _run_mixed_probe(args)
    report = probe_pretrained(
        args.model,
        args.dataset,
        output_dir=args.output_dir,
        plot=args.plot,
        device=device_argument(args),
        properties=args.properties,
        baselines=[] if args.baselines == ["none"] else args.baselines,
        max_raw_features=args.max_raw_features,
        include_layer_means=args.layer_means,
        **({"feature_sets": HEAD_FEATURE_SETS} if args.all_features else {}),
        window=args.window,
        halo=args.halo,
        batch_size=args.batch_size,
    )
    print(report.table())
    if args.output_dir:
        print(f"results written to {args.output_dir}")
    return 0


def _run_mixed_probe(args) -> int:
    from sane_hf.recipes.multiarch import mixed_probe_table, probe_mixed_pretrained

    models = dict(item.split("=", 1) for item in args.per_architecture_models or [])
    result = probe_mixed_pretrained(
        args.model,
        args.dataset,
        output_dir=args.output_dir,
        per_architecture_models=models,
        device=device_argument(args),
    )
    print(mixed_probe_table(result))
    return 0
