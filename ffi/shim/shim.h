/* Out-of-line wrappers for DPDK's static-inline fast-path functions, which bindgen cannot bind.
 * Each hp_* function does exactly what the DPDK function of the same name does. */
#ifndef HOSTPLANE_SHIM_H
#define HOSTPLANE_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <rte_mbuf.h>
#include <rte_ring.h>
#include <rte_ethdev.h>

uint16_t hp_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t hp_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *hp_pktmbuf_alloc(struct rte_mempool *mp);
int hp_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned count);
void hp_pktmbuf_free(struct rte_mbuf *m);
void *hp_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t hp_pktmbuf_data_len(const struct rte_mbuf *m);
uint32_t hp_pktmbuf_pkt_len(const struct rte_mbuf *m);
uint16_t hp_pktmbuf_nb_segs(const struct rte_mbuf *m);
uint32_t hp_pktmbuf_rss_hash(const struct rte_mbuf *m);
char *hp_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
int hp_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
uint16_t hp_pktmbuf_tailroom(const struct rte_mbuf *m);
unsigned hp_lcore_id(void);
int hp_errno(void);
uint64_t hp_rdtsc(void);
void hp_pause(void);
void hp_prefetch0(const void *p);
int hp_ring_enqueue(struct rte_ring *r, void *obj);
int hp_ring_dequeue(struct rte_ring *r, void **obj);
unsigned hp_ring_enqueue_burst(struct rte_ring *r, void *const *objs, unsigned n);
unsigned hp_ring_dequeue_burst(struct rte_ring *r, void **objs, unsigned n);
unsigned hp_ring_count(const struct rte_ring *r);
/* offsetof(struct rte_mbuf, f) for buf_addr, data_off, nb_segs, pkt_len, data_len, in that order,
 * so the Rust side can check the bindgen layout it reads on the fast path. */
void hp_mbuf_layout(size_t out[5]);
#endif
