"""Triton's interpreter (TRITON_INTERPRET=1, how CI runs the kernels) has tensor-descriptor loads and stores but
not the descriptor reduce that `desc.atomic_add` compiles to (Hopper's bulk TMA reduce-add). The GPU op adds a
tile into global memory element by element, dropping what falls outside the described tensor; this gives the
interpreter exactly that, through its own element-wise atomic add, so the kernels' descriptor path runs on CPU."""


def teach_descriptor_reduce_add() -> None:
    """Add `create_descriptor_reduce` (kind ADD) to the interpreter's builder where it lacks one."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, offsets):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduce {kind} in the interpreter")
        ptrs, in_bounds = desc.materialize_pointers(offsets)  # the tile's addresses; False outside the tensor
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, in_bounds, ir.MEM_SEMANTIC.RELAXED,
                                      ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce
