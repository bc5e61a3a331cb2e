// SPDX-License-Identifier: GPL-2.0
/*
 * emudev_testdev: guest driver for emudev's test device (emudev/src/testdev/regs.rs), used
 * by tests/guest/case-testdev.sh. The guest kernel has no VFIO no-IOMMU, so MSI-X and DMA
 * can only be exercised from a kernel driver.
 *
 * Probe enables the device, maps BAR0, checks ID == MAGIC, sets a 64-bit DMA mask and
 * requests every MSI-X vector it gets (2..4) as "emudev-testdev-N". Tests run on demand
 * through the device attribute `selftest`: write a command, read back "ok" or "FAIL: why".
 *
 *   irq N              raise vector N with IRQ_RAISE, wait for its handler
 *   fill [LEN]         device FILLs a coherent buffer with a pattern, guest checks each byte
 *   checksum [LEN]     guest writes random bytes, device CHECKSUMs (FNV-1a 32), compare
 *   copy [LEN]         device COPYs buffer A to B, guest compares
 *   bad                device FILLs an address outside guest RAM: must end in status ERROR,
 *                      count it in DMA_ERRORS and still raise the completion interrupt
 *   read OFF           BAR0 register read, result "0x%08x"
 *   write OFF VAL      BAR0 register write
 *
 * Every DMA job also asks for a completion interrupt on the last vector and checks that it
 * arrives. Every wait has a timeout. A buffer of a job that did not stop in time is leaked
 * rather than freed, so a late device write cannot corrupt reused memory.
 */
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/string.h>

#define TD_VENDOR 0xe0de
#define TD_DEVICE 0xe0de
#define TD_MAGIC 0xe0de7e57

#define REG_ID 0x00
#define REG_VERSION 0x04
#define REG_IRQ_RAISE 0x18
#define REG_DMA_DST 0x20
#define REG_DMA_SRC 0x28
#define REG_DMA_LEN 0x30
#define REG_DMA_PATTERN 0x34
#define REG_DMA_REPEAT 0x38
#define REG_DMA_VECTOR 0x3c
#define REG_DMA_CMD 0x40
#define REG_DMA_STATUS 0x44
#define REG_DMA_RESULT 0x48
#define REG_DMA_PASSES 0x4c
#define REG_DMA_ERRORS 0x50
#define BAR0_SIZE 0x1000

#define CMD_FILL 1
#define CMD_CHECKSUM 2
#define CMD_COPY 3
#define CMD_STOP 0x80

#define ST_IDLE 0
#define ST_BUSY 1
#define ST_DONE 2
#define ST_ERROR 3

#define MAX_VECTORS 4
#define IRQ_TIMEOUT_MS 5000
#define DMA_TIMEOUT_MS 20000
/* default job length: not a multiple of the device's 4 KiB chunk or of the pattern */
#define DEFAULT_LEN (3 * 4096 + 123)
#define MAX_LEN (1 << 20)
/* bytes after the job checked for stray writes */
#define GUARD 64
#define GUARD_BYTE 0x5a
#define RESULT_LEN 160

struct td_vec {
	struct td *td;
	int irq;
	bool requested;
	atomic_t count;
	struct completion done;
	char name[32];
};

struct td {
	struct pci_dev *pdev;
	void __iomem *regs;
	int nvec;
	struct td_vec vec[MAX_VECTORS];
	struct mutex lock; /* serializes selftests and `result` */
	char result[RESULT_LEN];
};

/* A coherent buffer of `len` bytes plus GUARD trailing bytes. */
struct td_buf {
	void *cpu;
	dma_addr_t dma;
	size_t size;
};

static u32 rd(struct td *td, u32 off)
{
	return ioread32(td->regs + off);
}

static void wr(struct td *td, u32 off, u32 val)
{
	iowrite32(val, td->regs + off);
}

static void wr64(struct td *td, u32 off, u64 val)
{
	wr(td, off, lower_32_bits(val));
	wr(td, off + 4, upper_32_bits(val));
}

static u32 fnv1a(const u8 *p, size_t n)
{
	u32 h = 0x811c9dc5;
	size_t i;

	for (i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x01000193;
	}
	return h;
}

static irqreturn_t td_irq(int irq, void *data)
{
	struct td_vec *v = data;

	atomic_inc(&v->count);
	complete(&v->done);
	return IRQ_HANDLED;
}

static int buf_alloc(struct td *td, struct td_buf *b, size_t len)
{
	b->size = len + GUARD;
	b->cpu = dma_alloc_coherent(&td->pdev->dev, b->size, &b->dma, GFP_KERNEL);
	if (!b->cpu)
		return -ENOMEM;
	memset(b->cpu, GUARD_BYTE, b->size);
	return 0;
}

static void buf_free(struct td *td, struct td_buf *b)
{
	if (b->cpu)
		dma_free_coherent(&td->pdev->dev, b->size, b->cpu, b->dma);
	b->cpu = NULL;
}

/* True when the GUARD bytes after `len` are untouched. */
static bool guard_ok(struct td_buf *b, size_t len)
{
	const u8 *p = b->cpu;
	size_t i;

	for (i = len; i < b->size; i++)
		if (p[i] != GUARD_BYTE)
			return false;
	return true;
}

/*
 * Program and run one DMA job, wait for DONE and the completion interrupt. Returns 0 when
 * the job completed; otherwise writes the reason to td->result and returns -EIO, or
 * -EBUSY when the device did not stop (the caller must then leak the buffers).
 */
static int run_job(struct td *td, u32 cmd, u64 dst, u64 src, u32 len, u32 pattern)
{
	int vec = td->nvec - 1;
	struct td_vec *v = &td->vec[vec];
	unsigned long deadline = jiffies + msecs_to_jiffies(DMA_TIMEOUT_MS);
	u32 errors0 = rd(td, REG_DMA_ERRORS), st, passes;

	wr64(td, REG_DMA_DST, dst);
	wr64(td, REG_DMA_SRC, src);
	wr(td, REG_DMA_LEN, len);
	wr(td, REG_DMA_PATTERN, pattern);
	wr(td, REG_DMA_REPEAT, 1);
	wr(td, REG_DMA_VECTOR, vec);
	reinit_completion(&v->done);
	wr(td, REG_DMA_CMD, cmd);
	for (;;) {
		st = rd(td, REG_DMA_STATUS);
		if (st != ST_BUSY)
			break;
		if (time_after(jiffies, deadline)) {
			wr(td, REG_DMA_CMD, CMD_STOP);
			msleep(500);
			st = rd(td, REG_DMA_STATUS);
			snprintf(td->result, RESULT_LEN,
				 "FAIL: job %u still busy after %d ms (status after STOP %u)",
				 cmd, DMA_TIMEOUT_MS, st);
			return st == ST_BUSY ? -EBUSY : -EIO;
		}
		usleep_range(200, 1000);
	}
	if (st != ST_DONE) {
		snprintf(td->result, RESULT_LEN,
			 "FAIL: job %u status %u, DMA_ERRORS %u -> %u", cmd, st, errors0,
			 rd(td, REG_DMA_ERRORS));
		return -EIO;
	}
	passes = rd(td, REG_DMA_PASSES);
	if (passes != 1) {
		snprintf(td->result, RESULT_LEN, "FAIL: job %u DMA_PASSES %u, want 1", cmd,
			 passes);
		return -EIO;
	}
	if (!wait_for_completion_timeout(&v->done, msecs_to_jiffies(IRQ_TIMEOUT_MS))) {
		snprintf(td->result, RESULT_LEN,
			 "FAIL: job %u done but no completion interrupt on vector %d", cmd, vec);
		return -EIO;
	}
	return 0;
}

static void test_irq(struct td *td, unsigned int n)
{
	struct td_vec *v;
	int before;

	if (n >= td->nvec) {
		snprintf(td->result, RESULT_LEN, "FAIL: vector %u >= %d allocated", n, td->nvec);
		return;
	}
	v = &td->vec[n];
	before = atomic_read(&v->count);
	reinit_completion(&v->done);
	wr(td, REG_IRQ_RAISE, n);
	if (!wait_for_completion_timeout(&v->done, msecs_to_jiffies(IRQ_TIMEOUT_MS)))
		snprintf(td->result, RESULT_LEN, "FAIL: timeout, no interrupt on vector %u", n);
	else
		snprintf(td->result, RESULT_LEN, "ok (vector %u count %d -> %d)", n, before,
			 atomic_read(&v->count));
}

static void test_fill(struct td *td, u32 len)
{
	struct td_buf b = {};
	const u32 pattern = 0xa5c31e7f;
	const u8 *p;
	u8 want;
	size_t i;
	int rc;

	if (buf_alloc(td, &b, len)) {
		snprintf(td->result, RESULT_LEN, "FAIL: no memory for %u bytes", len);
		return;
	}
	rc = run_job(td, CMD_FILL, b.dma, 0, len, pattern);
	if (rc == -EBUSY)
		return; /* leak b: the device may still write it */
	if (rc)
		goto out;
	p = b.cpu;
	for (i = 0; i < len; i++) {
		want = (pattern >> (8 * (i % 4))) & 0xff;
		if (p[i] != want) {
			snprintf(td->result, RESULT_LEN,
				 "FAIL: byte %zu of %u is 0x%02x, want 0x%02x", i, len, p[i], want);
			goto out;
		}
	}
	if (!guard_ok(&b, len)) {
		snprintf(td->result, RESULT_LEN, "FAIL: device wrote past %u bytes", len);
		goto out;
	}
	snprintf(td->result, RESULT_LEN, "ok (%u bytes at %pad)", len, &b.dma);
out:
	buf_free(td, &b);
}

static void test_checksum(struct td *td, u32 len)
{
	struct td_buf b = {};
	u32 want, got;
	int rc;

	if (buf_alloc(td, &b, len)) {
		snprintf(td->result, RESULT_LEN, "FAIL: no memory for %u bytes", len);
		return;
	}
	get_random_bytes(b.cpu, len);
	want = fnv1a(b.cpu, len);
	rc = run_job(td, CMD_CHECKSUM, 0, b.dma, len, 0);
	if (rc == -EBUSY)
		return;
	if (rc)
		goto out;
	got = rd(td, REG_DMA_RESULT);
	if (got != want)
		snprintf(td->result, RESULT_LEN, "FAIL: device checksum 0x%08x, guest 0x%08x",
			 got, want);
	else if (fnv1a(b.cpu, len) != want)
		snprintf(td->result, RESULT_LEN, "FAIL: device changed the source buffer");
	else
		snprintf(td->result, RESULT_LEN, "ok (%u bytes, fnv1a 0x%08x)", len, got);
out:
	buf_free(td, &b);
}

static void test_copy(struct td *td, u32 len)
{
	struct td_buf a = {}, b = {};
	const u8 *pa, *pb;
	u32 ha;
	size_t i;
	int rc;

	if (buf_alloc(td, &a, len) || buf_alloc(td, &b, len)) {
		snprintf(td->result, RESULT_LEN, "FAIL: no memory for 2 x %u bytes", len);
		goto out;
	}
	get_random_bytes(a.cpu, len);
	ha = fnv1a(a.cpu, len);
	rc = run_job(td, CMD_COPY, b.dma, a.dma, len, 0);
	if (rc == -EBUSY)
		return;
	if (rc)
		goto out;
	pa = a.cpu;
	pb = b.cpu;
	for (i = 0; i < len; i++) {
		if (pa[i] != pb[i]) {
			snprintf(td->result, RESULT_LEN,
				 "FAIL: byte %zu of %u is 0x%02x, source 0x%02x", i, len, pb[i],
				 pa[i]);
			goto out;
		}
	}
	if (!guard_ok(&b, len))
		snprintf(td->result, RESULT_LEN, "FAIL: device wrote past %u bytes", len);
	else if (fnv1a(a.cpu, len) != ha)
		snprintf(td->result, RESULT_LEN, "FAIL: device changed the source buffer");
	else
		snprintf(td->result, RESULT_LEN, "ok (%u bytes %pad -> %pad)", len, &a.dma,
			 &b.dma);
out:
	buf_free(td, &b);
	buf_free(td, &a);
}

static void test_bad(struct td *td)
{
	/* far above any RAM or MMIO of the test guest, below the 64-bit DMA mask */
	const u64 bad = 1ULL << 46;
	int vec = td->nvec - 1;
	struct td_vec *v = &td->vec[vec];
	unsigned long deadline = jiffies + msecs_to_jiffies(DMA_TIMEOUT_MS);
	u32 errors0 = rd(td, REG_DMA_ERRORS), errors, st;

	wr64(td, REG_DMA_DST, bad);
	wr(td, REG_DMA_LEN, 4096);
	wr(td, REG_DMA_PATTERN, 0x0badf00d);
	wr(td, REG_DMA_REPEAT, 1);
	wr(td, REG_DMA_VECTOR, vec);
	reinit_completion(&v->done);
	wr(td, REG_DMA_CMD, CMD_FILL);
	while ((st = rd(td, REG_DMA_STATUS)) == ST_BUSY && !time_after(jiffies, deadline))
		usleep_range(200, 1000);
	errors = rd(td, REG_DMA_ERRORS);
	if (st == ST_BUSY) {
		wr(td, REG_DMA_CMD, CMD_STOP);
		snprintf(td->result, RESULT_LEN, "FAIL: job to 0x%llx still busy", bad);
	} else if (st != ST_ERROR) {
		snprintf(td->result, RESULT_LEN, "FAIL: job to 0x%llx ended with status %u", bad, st);
	} else if (errors != errors0 + 1) {
		snprintf(td->result, RESULT_LEN, "FAIL: DMA_ERRORS %u -> %u, want +1", errors0, errors);
	} else if (!wait_for_completion_timeout(&v->done, msecs_to_jiffies(IRQ_TIMEOUT_MS))) {
		snprintf(td->result, RESULT_LEN, "FAIL: no interrupt on vector %d after the error", vec);
	} else {
		snprintf(td->result, RESULT_LEN, "ok (status ERROR, DMA_ERRORS %u -> %u)", errors0,
			 errors);
	}
}

static ssize_t selftest_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct td *td = dev_get_drvdata(dev);
	ssize_t n;

	mutex_lock(&td->lock);
	n = sysfs_emit(buf, "%s\n", td->result);
	mutex_unlock(&td->lock);
	return n;
}

static ssize_t selftest_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	struct td *td = dev_get_drvdata(dev);
	char cmd[16] = "";
	int sa = 0, sb = 0, n;
	u32 a, b;

	n = sscanf(buf, "%15s %i %i", cmd, &sa, &sb);
	if (n < 1)
		return -EINVAL;
	a = sa;
	b = sb;
	mutex_lock(&td->lock);
	snprintf(td->result, RESULT_LEN, "FAIL: unknown command");
	if (!strcmp(cmd, "irq") && n >= 2) {
		test_irq(td, a);
	} else if (!strcmp(cmd, "fill") || !strcmp(cmd, "checksum") || !strcmp(cmd, "copy")) {
		if (n < 2)
			a = DEFAULT_LEN;
		if (a == 0 || a > MAX_LEN)
			snprintf(td->result, RESULT_LEN, "FAIL: length %u not in 1..%d", a, MAX_LEN);
		else if (cmd[0] == 'f')
			test_fill(td, a);
		else if (cmd[1] == 'h')
			test_checksum(td, a);
		else
			test_copy(td, a);
	} else if (!strcmp(cmd, "bad")) {
		test_bad(td);
	} else if (!strcmp(cmd, "read") && n >= 2) {
		if (a > BAR0_SIZE - 4 || a % 4)
			snprintf(td->result, RESULT_LEN, "FAIL: bad offset 0x%x", a);
		else
			snprintf(td->result, RESULT_LEN, "0x%08x", rd(td, a));
	} else if (!strcmp(cmd, "write") && n >= 3) {
		if (a > BAR0_SIZE - 4 || a % 4) {
			snprintf(td->result, RESULT_LEN, "FAIL: bad offset 0x%x", a);
		} else {
			wr(td, a, b);
			snprintf(td->result, RESULT_LEN, "ok");
		}
	}
	dev_info(dev, "selftest %.*s: %s\n", (int)strcspn(buf, "\n"), buf, td->result);
	mutex_unlock(&td->lock);
	return count;
}
static DEVICE_ATTR_RW(selftest);

static void td_free_irqs(struct td *td)
{
	int i;

	for (i = 0; i < td->nvec; i++)
		if (td->vec[i].requested)
			free_irq(td->vec[i].irq, &td->vec[i]);
	if (td->nvec > 0)
		pci_free_irq_vectors(td->pdev);
	td->nvec = 0;
}

static int td_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct td *td;
	u32 magic;
	int rc, i;

	td = kzalloc(sizeof(*td), GFP_KERNEL);
	if (!td)
		return -ENOMEM;
	td->pdev = pdev;
	mutex_init(&td->lock);
	snprintf(td->result, RESULT_LEN, "no test run yet");
	pci_set_drvdata(pdev, td);

	rc = pci_enable_device(pdev);
	if (rc) {
		dev_err(&pdev->dev, "enable failed: %d\n", rc);
		goto err_free;
	}
	pci_set_master(pdev);
	/*
	 * No pci_request_region: with CONFIG_IO_STRICT_DEVMEM a busy BAR cannot be mmapped
	 * through sysfs, and the test pokes BAR0/BAR2 with guest-mmio while we are bound.
	 */
	if (pci_resource_len(pdev, 0) < BAR0_SIZE ||
	    !(pci_resource_flags(pdev, 0) & IORESOURCE_MEM)) {
		dev_err(&pdev->dev, "BAR0 is not a >= 4 KiB memory BAR\n");
		rc = -ENODEV;
		goto err_disable;
	}
	td->regs = pci_iomap(pdev, 0, BAR0_SIZE);
	if (!td->regs) {
		rc = -ENOMEM;
		goto err_disable;
	}
	magic = rd(td, REG_ID);
	if (magic != TD_MAGIC) {
		dev_err(&pdev->dev, "ID register 0x%08x, want 0x%08x\n", magic, TD_MAGIC);
		rc = -ENODEV;
		goto err_unmap;
	}
	rc = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (rc) {
		dev_err(&pdev->dev, "no 64-bit DMA: %d\n", rc);
		goto err_unmap;
	}
	rc = pci_alloc_irq_vectors(pdev, 2, MAX_VECTORS, PCI_IRQ_MSIX);
	if (rc < 0) {
		dev_err(&pdev->dev, "MSI-X: %d\n", rc);
		goto err_unmap;
	}
	td->nvec = rc;
	for (i = 0; i < td->nvec; i++) {
		struct td_vec *v = &td->vec[i];

		v->td = td;
		init_completion(&v->done);
		atomic_set(&v->count, 0);
		snprintf(v->name, sizeof(v->name), "emudev-testdev-%d", i);
		v->irq = pci_irq_vector(pdev, i);
		rc = request_irq(v->irq, td_irq, 0, v->name, v);
		if (rc) {
			dev_err(&pdev->dev, "request_irq %d: %d\n", v->irq, rc);
			goto err_irqs;
		}
		v->requested = true;
	}
	rc = device_create_file(&pdev->dev, &dev_attr_selftest);
	if (rc)
		goto err_irqs;
	dev_info(&pdev->dev, "emudev test device version %u, %d MSI-X vectors\n",
		 rd(td, REG_VERSION), td->nvec);
	return 0;

err_irqs:
	td_free_irqs(td);
err_unmap:
	pci_iounmap(pdev, td->regs);
err_disable:
	pci_clear_master(pdev);
	pci_disable_device(pdev);
err_free:
	kfree(td);
	return rc;
}

static void td_remove(struct pci_dev *pdev)
{
	struct td *td = pci_get_drvdata(pdev);

	device_remove_file(&pdev->dev, &dev_attr_selftest);
	/* A selftest cannot run any more; stop any job the device may still run. */
	wr(td, REG_DMA_CMD, CMD_STOP);
	td_free_irqs(td);
	pci_iounmap(pdev, td->regs);
	pci_clear_master(pdev);
	pci_disable_device(pdev);
	kfree(td);
	dev_info(&pdev->dev, "removed\n");
}

static const struct pci_device_id td_ids[] = {
	{ PCI_DEVICE(TD_VENDOR, TD_DEVICE) },
	{}
};
MODULE_DEVICE_TABLE(pci, td_ids);

static struct pci_driver td_driver = {
	.name = "emudev_testdev",
	.id_table = td_ids,
	.probe = td_probe,
	.remove = td_remove,
};
module_pci_driver(td_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Guest driver for the emudev vfio-user test device (selftests)");
