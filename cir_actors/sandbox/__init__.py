"""The isolated Python interpreter: the pool (supervisor side), the zygote, the sandboxed
child, and the kernel layers they are made of."""
