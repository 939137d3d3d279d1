/* cffi declarations of native/flashgguf.h (values of constants come from the header). */
#define FG_OK ...
#define FG_ERR_NOMEM ...
#define FG_ERR_IO ...
#define FG_ERR_SHORT_READ ...
#define FG_ERR_ARG ...
#define FG_ERR_TYPE ...
#define FG_ERR_SHAPE ...
#define FG_ERR_STATE ...
#define FG_ERR_THREADS ...
#define FG_ERR_BUDGET ...
#define FG_TYPE_F32 ...
#define FG_TYPE_F16 ...
#define FG_TYPE_Q4_0 ...
#define FG_TYPE_Q4_1 ...
#define FG_TYPE_Q5_0 ...
#define FG_TYPE_Q5_1 ...
#define FG_TYPE_Q8_0 ...
#define FG_TYPE_Q8_1 ...
#define FG_TYPE_Q4_K ...
#define FG_TYPE_Q5_K ...
#define FG_TYPE_Q6_K ...
#define FG_TYPE_Q8_K ...
#define FG_ACT_SILU ...
#define FG_ACT_GELU ...
#define FG_ACT_RELU ...
#define FG_ACT_RELU2 ...
#define FG_ACT_FATRELU ...
#define FG_ACT_DRELU ...
#define FG_PART_GATE ...
#define FG_PART_UP ...
#define FG_PART_DOWN ...
#define FG_MODE_DENSE ...
#define FG_MODE_NAIVE ...
#define FG_MODE_HYBRID ...
#define FG_MODE_PREDICTED ...
#define FG_IO_AUTO ...
#define FG_IO_THREADS ...
#define FG_IO_URING ...

const char *fg_strerror(int code);
const char *fg_build_info(void);

size_t fg_row_size(int type, int64_t n);
int fg_block_size(int type);
int fg_vec_dot_type(int weight_type);
int fg_quantize_row(int type, const float *x, void *out, int64_t n);
int fg_quantize_row_ref(int type, const float *x, void *out, int64_t n);
int fg_dequantize_row(int type, const void *src, float *out, int64_t n);
int fg_vec_dot(int weight_type, const void *w, const void *xq, int64_t n, float *out);
int fg_vec_dot_ref(int weight_type, const void *w, const void *xq, int64_t n, float *out);
int fg_axpy(int type, const void *col, float a, float *y, int64_t n);
int fg_axpy_ref(int type, const void *col, float a, float *y, int64_t n);
int fg_activate(int activation, float threshold, float *x, int64_t n);
const char *fg_simd_name(void);

typedef struct fg_runtime fg_runtime;

typedef struct fg_config {
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_ff;
    int32_t gated;
    int32_t activation;
    float activation_threshold;
    int32_t part_type[3];
    int64_t part_offset[3];
    int64_t bundle_stride;
    int32_t max_tokens;
    int32_t n_threads;
    int32_t n_threads_batch;
    int32_t use_direct_io;
    char input_node[32];
    char output_node[32];
    int32_t mode;
    int64_t dram_budget;
    float pinned_share;
    int32_t window_tokens;
    int32_t coalesce_gap;
    int32_t coalesce_bytes;
    int32_t io_backend;
    int32_t io_depth;
    int32_t max_read_bytes;
    int32_t read_log_cap;
} fg_config;

typedef struct fg_stats {
    uint64_t tokens;
    uint64_t bytes_read;
    uint64_t reads;
    uint64_t bytes_needed;
    uint64_t cache_hits;
    uint64_t cache_misses;
    uint64_t neurons_computed;
    uint64_t pinned_neurons;
    uint64_t window_evictions;
    double time_predict_s;
    double time_io_wait_s;
    double time_ffn_s;
    double time_total_s;
} fg_stats;

int fg_runtime_create(const fg_config *cfg, const char *path, fg_runtime **out);
void fg_runtime_destroy(fg_runtime *rt);
int fg_runtime_set_layer_layout(fg_runtime *rt, int32_t layer, const int32_t *part_type,
                                const int64_t *part_offset, int64_t stride);
int fg_runtime_set_layer(fg_runtime *rt, int32_t layer, uint64_t bundle_offset,
                         const float *up_bias, const float *gate_bias, const float *down_bias);
int fg_runtime_set_predictor(fg_runtime *rt, int32_t layer, int32_t rank, const void *a,
                             const void *b, const void *b_up, const float *scale,
                             float threshold);
int fg_runtime_set_predictor_sigma(fg_runtime *rt, int32_t layer, const float *sigma_g,
                                   const float *sigma_u);
int fg_runtime_set_layer_weight(fg_runtime *rt, int32_t layer, double weight);
int fg_runtime_load(fg_runtime *rt);
int64_t fg_runtime_min_budget(const fg_runtime *rt);
int fg_runtime_plan(const fg_runtime *rt, int32_t *capacity, int32_t *pinned);
int fg_runtime_layer_capacity(const fg_runtime *rt, int32_t layer, int32_t *capacity,
                              int32_t *pinned);
int fg_runtime_io_backend(const fg_runtime *rt);
int fg_runtime_direct_io(const fg_runtime *rt);
int fg_runtime_ffn(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens);
int fg_runtime_ffn_masked(fg_runtime *rt, int32_t layer, const float *x, float *y,
                          int32_t n_tokens, const uint8_t *mask);
int fg_runtime_predict(fg_runtime *rt, int32_t layer, const float *x, int32_t n_tokens,
                       uint8_t *out);
int fg_runtime_debug_slots(const fg_runtime *rt, int32_t layer, int32_t *row_of_slot,
                           uint64_t *last_used, uint64_t *clock);
int fg_runtime_debug_row(const fg_runtime *rt, int32_t layer, int32_t row, void *out);
int64_t fg_runtime_debug_reads(const fg_runtime *rt, uint64_t *offset, uint64_t *len,
                               int64_t cap);
void fg_runtime_debug_fail_reads(fg_runtime *rt, int errno_value, int64_t after);
void fg_runtime_debug_delay_reads(fg_runtime *rt, int64_t delay_us, int32_t every);
int fg_runtime_take_error(fg_runtime *rt, char *msg, size_t msg_cap);
void fg_runtime_get_stats(const fg_runtime *rt, fg_stats *out);
void fg_runtime_reset_stats(fg_runtime *rt);
bool fg_eval_callback(void *tensor, bool ask, void *user_data);

typedef struct fg_capture fg_capture;
int fg_capture_create(int32_t n_layer, int32_t n_embd, const char *node, int32_t max_rows,
                      fg_capture **out);
void fg_capture_destroy(fg_capture *c);
bool fg_capture_callback(void *tensor, bool ask, void *user_data);
int32_t fg_capture_rows(const fg_capture *c, int32_t layer);
int fg_capture_take(fg_capture *c, int32_t layer, float *out, int32_t out_rows);
int fg_capture_take_error(fg_capture *c, char *msg, size_t msg_cap);
