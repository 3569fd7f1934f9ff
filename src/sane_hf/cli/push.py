"""`sane-hf push`: upload a saved SANE model (with processor, probe heads and a card for the
target repo, in one commit) or zoo dataset to the Hub. Errors are raised (one line, with the repo
and HTTP status for Hub failures: `sane_hf.hub.HubError`) and reported by the CLI's main."""

from __future__ import annotations

from sane_hf.cli.common import check_sources


def register(subparsers) -> None:
    """Add this module's command to the `sane-hf` parser."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved SANE model folder or zoo dataset folder to the Hugging Face Hub",
    )
    parser.add_argument("path", help="a save_pretrained folder or a save_zoo_dataset folder")
    parser.add_argument("repo_id", help="Hub repo, e.g. your-name/sane-cnn-mnist")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", help="default: 'Upload ... with sane-hf'")
    parser.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from sane_hf.hub import push_folder

    check_sources({"path": args.path}, local=True)

    commit = push_folder(
        args.path, args.repo_id, private=args.private or None, commit_message=args.commit_message
    )
    print(f"pushed {args.path} to {commit.commit_url}")
    return 0
