from x_transformers.ops.simple_gla.naive import naive_simple_gla


def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    o, ht = naive_simple_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(v.dtype), ht


fused_recurrent_simple_gla = chunk_simple_gla

__all__ = ["chunk_simple_gla", "fused_recurrent_simple_gla", "naive_simple_gla"]
