// The h2d engine copies every job's bytes exactly (files and host sources, every chunk/thread/ring shape,
// jobs at chunk edges, empty jobs and sources), checks digests, and leaves no stream, event, registration
// or pinned buffer behind. Runs against the fake driver, which defers async copies until an event recorded
// after them is synchronised, so a pinned buffer reused too early shows up as wrong bytes.
#include <sys/mman.h>

#include "h2d_helpers.h"

namespace h2d = ds::h2d;
using t::MiB;

namespace {

struct Target {
	h2d::Job job;
	std::vector<unsigned char> want;
};

// Allocates device memory for each (off, n) of src's bytes, filled with a pattern the copy must overwrite.
std::vector<Target> targets(h2d::Device &d, size_t source, const std::vector<unsigned char> &bytes,
			    const std::vector<std::pair<uint64_t, uint64_t>> &pieces)
{
	std::vector<Target> out;
	for (auto [off, n] : pieces) {
		Target tg{{source, off, n, d.alloc(n)}, std::vector<unsigned char>(bytes.begin() + long(off),
									     bytes.begin() + long(off + n))};
		std::vector<unsigned char> junk(n ? n : 1, 0xCD);
		d.htod(tg.job.dst, junk.data(), junk.size());
		out.push_back(tg);
	}
	return out;
}

int verify(h2d::Device &d, const std::vector<Target> &ts, bool copied, const char *what)
{
	for (auto &tg : ts) {
		if (tg.want.empty())
			continue;  // an empty job: nothing to read back
		std::vector<unsigned char> got(tg.want.size());
		d.dtoh(got.data(), tg.job.dst, got.size());
		if (copied)
			CHECK(got == tg.want, "%s: job (%zu, %llu, %llu) differs", what, tg.job.source,
			      (unsigned long long)tg.job.off, (unsigned long long)tg.job.n);
		else
			CHECK(got == std::vector<unsigned char>(got.size(), 0xCD), "%s: copy=false wrote to the device", what);
	}
	return T_PASS;
}

int balanced(const char *what)
{
	CHECK(t::live(t::STREAMS) == 0 && t::live(t::EVENTS) == 0 && t::live(t::REGISTERED) == 0,
	      "%s: streams %ld events %ld registrations %ld still live", what, t::live(t::STREAMS),
	      t::live(t::EVENTS), t::live(t::REGISTERED));
	return T_PASS;
}

int run()
{
	t::TempDir tmp;
	const size_t C = DS_DIGEST_CHUNK;
	// file 0: crosses two chunk edges; file 1: exactly one chunk; file 2: empty; file 3: small, no digest
	std::vector<unsigned char> a = t::random_bytes(2 * C + 12345, 1), b = t::random_bytes(C, 2), e,
				   c = t::random_bytes(4097, 3);
	std::vector<h2d::Source> src(4);
	src[0].path = tmp.write("a", a.data(), a.size());
	src[1].path = tmp.write("b", b.data(), b.size());
	src[2].path = tmp.write("e", nullptr, 0);
	src[3].path = tmp.write("c", c.data(), c.size());
	const std::vector<unsigned char> *bytes[] = {&a, &b, &e, &c};
	for (size_t i = 0; i < 3; i++) {
		src[i].size = bytes[i]->size();
		src[i].has_digest = true;
		src[i].digest = ds_digest_region(bytes[i]->data(), bytes[i]->size());
	}
	src[3].size = c.size();

	h2d::Device dev(0);
	CHECK(dev.name() == "Fake GPU", "name %s", dev.name().c_str());
	CHECK(dev.pinned_bytes() == 0, "no ring before a load");
	std::vector<Target> ts, more;
	// jobs: one byte at 0, up to the first chunk edge, across the second edge, the last byte, an empty one
	ts = targets(dev, 0, a, {{0, 1}, {1, C - 1}, {C, C + 12344}, {2 * C + 12344, 1}, {5, 0}});
	more = targets(dev, 1, b, {{C - 4096, 4096}, {0, 4096}, {4096, C - 8192}});  // unsorted on purpose
	ts.insert(ts.end(), more.begin(), more.end());
	more = targets(dev, 3, c, {{1, 4095}});
	ts.insert(ts.end(), more.begin(), more.end());
	uint64_t want_bytes = 0;
	std::vector<h2d::Job> jobs;
	for (auto &tg : ts) {
		jobs.push_back(tg.job);
		want_bytes += tg.job.n;
	}

	struct Shape {
		size_t chunk;
		int threads, nbuf, direct;
	} shapes[] = {
		{C, 1, 2, 0}, {C, 3, 3, 0}, {2 * C, 2, 2, 0}, {C, 100, 1, 0},  // threads and nbuf clamped
		{C, 2, 2, 1}, {C, 2, 4, 2}, {3 * C, 1, 16, 1},
	};
	size_t ring = 0;
	for (auto &sh : shapes) {
		char what[96];
		std::snprintf(what, sizeof(what), "chunk %zu MiB, %d threads, nbuf %d, direct %d", sh.chunk / MiB,
			      sh.threads, sh.nbuf, sh.direct);
		for (auto &tg : ts) {  // reset the device bytes, so each shape must copy them again
			std::vector<unsigned char> junk(tg.want.size() ? tg.want.size() : 1, 0xCD);
			dev.htod(tg.job.dst, junk.data(), junk.size());
		}
		h2d::LoadOptions opt;
		opt.chunk = sh.chunk;
		opt.threads = sh.threads;
		opt.nbuf = sh.nbuf;
		opt.direct = sh.direct;
		h2d::LoadResult r = dev.load(src, jobs, opt);
		CHECK(r.ok, "%s: %s: %s", what, r.kind.c_str(), r.error.c_str());
		CHECK(r.kind.empty() && r.error.empty() && r.code == 0 && r.source == -1, "%s: clean result", what);
		CHECK(r.bytes == want_bytes, "%s: bytes %llu", what, (unsigned long long)r.bytes);
		CHECK(r.direct.size() == src.size() && r.host_mode.empty(), "%s: per-source result", what);
		CHECK(sh.direct != 0 || !r.direct[0], "%s: buffered when asked", what);
		CHECK(r.pinned_bytes >= ring && r.pinned_bytes == dev.pinned_bytes() && r.pinned_bytes > 0,
		      "%s: the ring only grows (%zu after %zu)", what, r.pinned_bytes, ring);
		ring = r.pinned_bytes;
		if (verify(dev, ts, true, what) || balanced(what))
			return T_FAIL;
	}
	// copy=false reads and hashes every source, writes nothing to the device
	for (auto &tg : ts) {
		std::vector<unsigned char> junk(tg.want.size() ? tg.want.size() : 1, 0xCD);
		dev.htod(tg.job.dst, junk.data(), junk.size());
	}
	h2d::LoadOptions ro;
	ro.chunk = C;
	ro.threads = 2;
	ro.copy = false;
	h2d::LoadResult r = dev.load(src, {}, ro);
	CHECK(r.ok && r.bytes == 0, "copy=false: %s", r.error.c_str());
	if (verify(dev, ts, false, "copy=false") || balanced("copy=false"))
		return T_FAIL;
	// no sources, no jobs
	r = dev.load({}, {}, ro);
	CHECK(r.ok && r.bytes == 0 && r.direct.empty(), "empty load: %s", r.error.c_str());

	// host sources: a page-aligned mapping, registered or staged through the ring
	size_t hn = 2 * C + 777, hmap = (hn + 4095) / 4096 * 4096;
	void *m = mmap(nullptr, hmap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(m != MAP_FAILED, "mmap: %s", std::strerror(errno));
	std::vector<unsigned char> h = t::random_bytes(hn, 4);
	std::memcpy(m, h.data(), hn);
	std::vector<h2d::Source> hs(1);
	hs[0].addr = reinterpret_cast<uintptr_t>(m);
	hs[0].map_size = hmap;
	hs[0].size = hn;
	hs[0].has_digest = true;
	hs[0].digest = ds_digest_region(m, hn);
	std::vector<Target> ht = targets(dev, 0, h, {{0, C + 1}, {C + 1, C - 1}, {2 * C, 777}});
	std::vector<h2d::Job> hj;
	for (auto &tg : ht)
		hj.push_back(tg.job);
	struct HostCase {
		int mode;
		bool no_register;
		const char *used;
	} cases[] = {{0, false, "register"}, {1, false, "register"}, {2, false, "staged"}, {0, true, "staged"}};
	for (auto &hc : cases) {
		char what[64];
		std::snprintf(what, sizeof(what), "host_mode %d%s", hc.mode, hc.no_register ? ", no registration" : "");
		if (hc.no_register)
			CHECK(setenv("FAKE_CUDA_NO_REGISTER", "1", 1) == 0, "setenv");
		for (auto &tg : ht) {
			std::vector<unsigned char> junk(tg.want.size(), 0xCD);
			dev.htod(tg.job.dst, junk.data(), junk.size());
		}
		h2d::LoadOptions ho;
		ho.chunk = C;
		ho.threads = 2;
		ho.host_mode = hc.mode;
		r = dev.load(hs, hj, ho);
		CHECK(unsetenv("FAKE_CUDA_NO_REGISTER") == 0, "unsetenv");
		CHECK(r.ok, "%s: %s", what, r.error.c_str());
		CHECK(r.host_mode == hc.used, "%s: used %s", what, r.host_mode.c_str());
		if (verify(dev, ht, true, what) || balanced(what))
			return T_FAIL;
	}
	CHECK(munmap(m, hmap) == 0, "munmap: %s", std::strerror(errno));

	for (auto &tg : ts)
		dev.free(tg.job.dst);
	for (auto &tg : ht)
		dev.free(tg.job.dst);
	CHECK(t::live(t::DEV) == 0, "device allocations left: %ld", t::live(t::DEV));
	CHECK(t::live(t::HOST) > 0, "the ring is kept between loads");
	dev.close();
	dev.close();  // idempotent
	CHECK(t::live(t::HOST) == 0, "pinned buffers left after close: %ld", t::live(t::HOST));
	return balanced("end");
}

}  // namespace

int main()
{
	int rc = t::fake_driver();
	if (rc)
		return rc;
	try {
		return run();
	} catch (std::exception &e) {
		std::fprintf(stderr, "unexpected exception: %s\n", e.what());
		return T_FAIL;
	}
}
