"""Build the communicator named on the command line, for MODELS' MPI checks.

``chainermn-naive`` is ChainerMN's per-parameter MPI communicator (same
interface, used until hpcsgd's own algorithms exist); any other name goes to
``hpcsgd.create_communicator`` with float32 on the wire at every level, so
results can be compared with a single process within float32 tolerance
(the float16 wire formats are the communicator tests' business).
"""


def make_comm(name: str):
    if name == "chainermn-naive":
        import chainermn

        return chainermn.create_communicator("naive")
    import hpcsgd

    return hpcsgd.create_communicator(name, allreduce_grad_dtype="float32")
