"""`tfrec ask`: recommendations for a real user of a prepared dataset, from a running model server.

    tfrec ask --address 127.0.0.1:8500 --prepared artifacts/prepared/amazon-beauty \\
              --dataset amazon-beauty [--user 42 | --user-index 0] [--k 10]

What it does, over gRPC with the stock `PredictionServiceStub` (`export.client.PredictClient`):

1. takes the user's chronological history from the prepared data and holds out its
   last item (the leave-one-out test target), so the answer can be checked;
2. calls the recommender's `user_embedding` signature on the history (raw item tokens);
3. sends that vector to the retrieval servable (`retrieve`: ScaNN or brute force) for
   the top-k items;
4. calls the recommender's exact `recommend` signature (stock ops, brute force over the
   same table) and reports how many of the k items the index found (recall@k of this
   one query);
5. prints the history tail and both lists with item titles, and where the held-out
   item landed.

Items of the user's history may come back (the protocol of our evaluation does not
exclude them); `--exclude-history` drops them from both lists (the retrieval
servable's k is fixed at export, so fewer than k items may remain).
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

RECOMMENDER = "recommender"
RETRIEVAL = "retrieval_scann"


def item_titles(dataset: Optional[str], data_root=None) -> dict:
    """`{item token: title}` of a bundled dataset ({} when it has no titles)."""
    if not dataset:
        return {}
    from tfrec.data.readers import load_dataset

    items = load_dataset(dataset, data_root).items
    if items is None:
        return {}
    text = "title" if "title" in items.columns else next((c for c in items.columns if c != "item_id"), None)
    if text is None:
        return {}
    return dict(zip(items["item_id"].astype(str), items[text].astype(str)))


def user_history(prepared_dir, user: Optional[str] = None, user_index: int = 0):
    """`(user token, history tokens, held-out token)` of one user of a prepared dataset."""
    from tfrec.data.preprocess import load_prepared

    data = load_prepared(prepared_dir)
    users = list(data.user_vocab.tokens)
    if user is not None:
        row = int(data.user_vocab.lookup([user])[0]) - 2
        if row < 0:
            raise ValueError(f"user {user!r} is not in {prepared_dir}/user_vocab.txt ({len(users)} users)")
    else:
        if not 0 <= user_index < len(users):
            raise ValueError(f"--user-index must be in [0, {len(users)}), got {user_index}")
        row = user_index
    tokens = [data.item_vocab.tokens[int(i) - 2] for i in data.sequences[row]]
    if len(tokens) < 2:
        raise ValueError(f"user {users[row]!r} has {len(tokens)} interaction(s); need 2 (history + held-out)")
    return users[row], tokens[:-1], tokens[-1]


def ask(client, history, k=10, exclude_history=False, recommender=RECOMMENDER, retrieval=RETRIEVAL):
    """Query a server for one history; returns `{"retrieved", "exact", "recall"}`.

    `retrieved` / `exact`: lists of `(token, score)`; `recall`: share of the exact
    top-k that the retrieval servable returned.
    """
    embedding = client.predict(recommender, {"history": [history]}, signature="user_embedding")["embedding"]
    found = client.predict(retrieval, {"queries": embedding}, signature="retrieve")
    seen = set(history) if exclude_history else set()
    retrieved = [(t.decode(), float(s)) for t, s in zip(found["item_ids"][0], found["scores"][0])
                 if t and t.decode() not in seen][:k]
    exact_out = client.predict(recommender, {"history": [history], "exclude_history": [exclude_history]},
                               signature="recommend")
    exact = [(t.decode(), float(s)) for t, s in zip(exact_out["item_ids"][0], exact_out["scores"][0]) if t][:k]
    exact_set = {t for t, _ in exact}
    recall = len(exact_set & {t for t, _ in retrieved}) / max(len(exact_set), 1)
    return {"retrieved": retrieved, "exact": exact, "recall": recall}


def _title(titles, token, width=70):
    text = titles.get(token, "")
    return (text[: width - 1] + "…") if len(text) > width else text


def format_answer(user, history, held_out, answer, titles, tail=5, retrieval=RETRIEVAL) -> str:
    lines = [f"user {user}: {len(history)} items in history; last {min(tail, len(history))}:"]
    for token in history[-tail:]:
        lines.append(f"    {token:>8}  {_title(titles, token)}")
    lines.append(f"top-{len(answer['retrieved'])} from the retrieval servable '{retrieval}':")
    for rank, (token, score) in enumerate(answer["retrieved"], 1):
        mark = "  <- held-out next item" if token == held_out else ""
        lines.append(f"  {rank:2d}. {token:>8}  {score:8.3f}  {_title(titles, token)}{mark}")
    exact = [t for t, _ in answer["exact"]]
    where = f"rank {exact.index(held_out) + 1}" if held_out in exact else f"not in the top-{len(exact)}"
    lines.append(f"exact `recommend` agrees on {answer['recall']:.0%} of the top-{len(exact)} (recall of the index); "
                 f"held-out item {held_out} ({_title(titles, held_out, 50)}): {where}")
    return "\n".join(lines)


def _cmd_ask(args) -> None:
    from export.client import PredictClient

    user, history, held_out = user_history(args.prepared, args.user, args.user_index)
    titles = item_titles(args.dataset, args.data_root)
    with PredictClient(args.address) as client:
        answer = ask(client, history, k=args.k, exclude_history=args.exclude_history,
                     recommender=args.recommender, retrieval=args.retrieval)
    print(format_answer(user, history, held_out, answer, titles, retrieval=args.retrieval))
    sys.stdout.flush()


def add_commands(subparsers) -> None:
    """Register `tfrec ask`."""
    cmd = subparsers.add_parser("ask", help="top-k for a real user of a prepared dataset from a running server")
    cmd.add_argument("--address", default="127.0.0.1:8500", help="host:port of the gRPC endpoint")
    cmd.add_argument("--prepared", required=True, help="folder written by `tfrec prepare` (the user's history)")
    cmd.add_argument("--dataset", help="bundled dataset whose item titles to print")
    cmd.add_argument("--data-root", help="folder of the bundled datasets (default: ../shared/data)")
    cmd.add_argument("--user", help="user token (default: --user-index)")
    cmd.add_argument("--user-index", type=int, default=0, help="user by position in user_vocab.txt (default 0)")
    cmd.add_argument("--k", type=int, default=10)
    cmd.add_argument("--exclude-history", action="store_true", help="drop items the user already has")
    cmd.add_argument("--recommender", default=RECOMMENDER, help=f"model name (default {RECOMMENDER})")
    cmd.add_argument("--retrieval", default=RETRIEVAL, help=f"retrieval model name (default {RETRIEVAL})")
    cmd.set_defaults(func=_cmd_ask)
