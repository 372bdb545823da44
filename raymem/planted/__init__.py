"""The planted-memorization benchmark: a procedural world with known memorization (`world`), CPU
training of a tiny diffusion pipeline and CLIP on it (`training`), and the evaluation of raymem's
labels against the world's ground truth (`benchmark`). Nothing in the scan core imports this package."""
