"""A Chroma client for the vector-DB test (tests/src/chroma.rs runs it with the venv's python).

usage: client.py HOST PORT COLLECTION

Upserts three documents with explicit 3-dimensional embeddings (no embedding function, so no
model is ever downloaded), queries the nearest two to a fixed vector, prints one JSON line
{"ok": true, "ids": [...]} or {"ok": false, "errno": N or null, "error": "..."}, then keeps
its HTTP connection open until its stdin closes, so that the test can look at the server's
live connections while this client holds one.
"""

import json
import sys


def errno_of(exc):
    """The errno of the first OSError in the exception's cause/context chain, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def main():
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        import chromadb
        from chromadb.config import Settings

        client = chromadb.HttpClient(
            host=host, port=port, settings=Settings(anonymized_telemetry=False)
        )
        col = client.get_or_create_collection(name=name, embedding_function=None)
        col.upsert(
            ids=["kb-1", "kb-2", "kb-3"],
            embeddings=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            documents=["refund policy", "shipping times", "warranty terms"],
        )
        result = col.query(query_embeddings=[[0.9, 0.1, 0.0]], n_results=2)
        line = {"ok": True, "ids": result["ids"][0]}
    except Exception as exc:  # reported to the test as data: what failed and with which errno
        line = {"ok": False, "errno": errno_of(exc), "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(line), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
