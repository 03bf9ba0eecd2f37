#include <rte_config.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_pause.h>
#include <rte_prefetch.h>
#include "shim.h"

uint16_t hp_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{ return rte_eth_rx_burst(port, queue, pkts, n); }
uint16_t hp_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{ return rte_eth_tx_burst(port, queue, pkts, n); }
struct rte_mbuf *hp_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }
int hp_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned count)
{ return rte_pktmbuf_alloc_bulk(mp, mbufs, count); }
void hp_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
void *hp_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }
uint16_t hp_pktmbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }
uint32_t hp_pktmbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }
uint16_t hp_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
uint32_t hp_pktmbuf_rss_hash(const struct rte_mbuf *m)
{ return (m->ol_flags & RTE_MBUF_F_RX_RSS_HASH) ? m->hash.rss : 0; }
char *hp_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }
int hp_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }
uint16_t hp_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }
unsigned hp_lcore_id(void) { return rte_lcore_id(); }
int hp_errno(void) { return rte_errno; }
uint64_t hp_rdtsc(void) { return rte_rdtsc(); }
void hp_pause(void) { rte_pause(); }
void hp_prefetch0(const void *p) { rte_prefetch0(p); }
int hp_ring_enqueue(struct rte_ring *r, void *obj) { return rte_ring_enqueue(r, obj); }
int hp_ring_dequeue(struct rte_ring *r, void **obj) { return rte_ring_dequeue(r, obj); }
unsigned hp_ring_enqueue_burst(struct rte_ring *r, void *const *objs, unsigned n)
{ return rte_ring_enqueue_burst(r, objs, n, NULL); }
unsigned hp_ring_dequeue_burst(struct rte_ring *r, void **objs, unsigned n)
{ return rte_ring_dequeue_burst(r, objs, n, NULL); }
unsigned hp_ring_count(const struct rte_ring *r) { return rte_ring_count(r); }
void hp_mbuf_layout(size_t out[5])
{
	out[0] = offsetof(struct rte_mbuf, buf_addr);
	out[1] = offsetof(struct rte_mbuf, data_off);
	out[2] = offsetof(struct rte_mbuf, nb_segs);
	out[3] = offsetof(struct rte_mbuf, pkt_len);
	out[4] = offsetof(struct rte_mbuf, data_len);
}
