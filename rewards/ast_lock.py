"""One lock for every ``ast.parse`` flowrl makes in a process that serves threads.

CPython before 3.11.8 / 3.12.1 keeps the depth counter of its C-to-Python tree conversion in one per-interpreter
field, not per thread. When two threads parse at once and the garbage collector runs Python code (a ``__del__``)
in the middle of one conversion, the other thread moves that counter and the first raises ``SystemError: AST
constructor recursion depth mismatch``. numpy reads every ``.npy`` header with ``ast.literal_eval``, so the
reward server's handler threads and the client's threads hit this under load (one request of a thousand in
the fifty-client test failed this way). Every parse flowrl makes from threads takes this lock; the parses are
microseconds long (a header of at most a few hundred characters, an answer of bounded length).
"""
import threading

AST_LOCK = threading.Lock()
