/*
 * The middleware's request path, compiled: MiddlewareCore.__call__ and ._begin, ExchangeCore's
 * receive, send, finish and end, and adding up the finished requests of known label sets.
 * crowdmon/_core.py (and _receive_body in crowdmon/middleware.py, BufferedRequestRecorder in
 * crowdmon/_recorder.py) is the same code in Python; read it first.  Every branch here mirrors
 * one there, and the request-path tests run against both.
 *
 * What this buys is the interpreter's dispatch: a request crosses these functions on every
 * request, and in C they cost a fraction of their bytecode.  Everything that happens rarely (a
 * request ending without a response, a 5xx answer after the body, a route seen for the first
 * time, an exemplar, a header list no server sends, a label set not seen before) calls back
 * into Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

/* Objects of the Python side, looked up once when the module is imported. */
static PyObject *UNMATCHED_HANDLER;  /* crowdmon.catalogue.UNMATCHED_HANDLER */
static PyObject *CURRENT_REQUEST;    /* crowdmon.context.current_request */
static PyObject *RECEIVE_AFTER_THE_END, *SEND_AFTER_THE_END, *ODD_STATUS, *DECLARED_SIZE, *BODY_SIZE;
static PyObject *PERF_COUNTER;       /* time.perf_counter, where the C clock is not the same */
static PyObject *INSTRUMENTATION_MODULE;  /* its __dict__, once imported */
static PyObject *ZERO, *STATUS_500, *EMPTY_STR, *EMPTY_BYTES;
static int PERF_COUNTER_IS_MONOTONIC;

static PyObject *S_type, *S_http, *S_path, *S_root_path, *S_method, *S_body, *S_more_body,
    *S_status, *S_route, *S_fastapi, *S_effective_route_context, *S_headers,
    *S_response_start, *S_response_body, *S_response_pathsend, *S_default,
    *S_follow_the_default, *S_start_error, *S_pathsend, *S_route_label,
    *S_exemplar, *S_get, *S_site_start, *S_site_context, *S_site_send, *S_site_handler,
    *S_site_record, *S_response_zerocopysend, *S_zerocopysend;

/* time.perf_counter() as a double: the same clock, read without a call where it is CLOCK_MONOTONIC. */
static int
now(double *result)
{
#ifdef CLOCK_MONOTONIC
    if (PERF_COUNTER_IS_MONOTONIC) {
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
            *result = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
            return 0;
        }
    }
#endif
    PyObject *value = PyObject_CallNoArgs(PERF_COUNTER);
    if (value == NULL) {
        return -1;
    }
    *result = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return (*result == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* mapping[key] (a new reference) */
static PyObject *
get_item(PyObject *mapping, PyObject *key)
{
    if (PyDict_CheckExact(mapping)) {
        PyObject *value = PyDict_GetItemWithError(mapping, key);
        if (value == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, key);
            }
            return NULL;
        }
        return Py_NewRef(value);
    }
    return PyObject_GetItem(mapping, key);
}

/* mapping.get(key, default) (a new reference) */
static PyObject *
get_or(PyObject *mapping, PyObject *key, PyObject *fallback)
{
    if (PyDict_CheckExact(mapping)) {
        PyObject *value = PyDict_GetItemWithError(mapping, key);
        if (value == NULL) {
            return PyErr_Occurred() ? NULL : Py_NewRef(fallback);
        }
        return Py_NewRef(value);
    }
    return PyObject_CallMethodObjArgs(mapping, S_get, key, fallback, NULL);
}

/* The last str found equal to each constant compared with equals().  A message's "type" is
   most often the same object request after request (a constant in the app's or the server's
   code, not interned as it holds dots), so after one comparison of its characters an identity
   check answers, for that constant and for every other one.  Holds references to them. */
#define SEEN_SLOTS 8
static PyObject *SEEN_CONSTANT[SEEN_SLOTS], *SEEN_VALUE[SEEN_SLOTS];

/* value == constant, for a str constant: 1, 0 or -1 */
static int
equals(PyObject *value, PyObject *constant)
{
    if (value == constant) {
        return 1;
    }
    if (!PyUnicode_CheckExact(value)) {
        return PyObject_RichCompareBool(value, constant, Py_EQ);
    }
    int slot;
    for (slot = 0; slot < SEEN_SLOTS && SEEN_CONSTANT[slot] != NULL; slot++) {
        if (SEEN_VALUE[slot] == value) {
            return SEEN_CONSTANT[slot] == constant;  /* the constants differ from each other */
        }
    }
    if (PyUnicode_Compare(value, constant) != 0) {
        return 0;
    }
    for (slot = 0; slot < SEEN_SLOTS; slot++) {
        if (SEEN_CONSTANT[slot] == NULL || SEEN_CONSTANT[slot] == constant) {
            SEEN_CONSTANT[slot] = constant;  /* an interned constant of this module: never freed */
            Py_XSETREF(SEEN_VALUE[slot], Py_NewRef(value));
            break;
        }
    }
    return 1;
}

static void
set_field(PyObject **field, PyObject *value)
{
    Py_XSETREF(*field, Py_NewRef(value));
}

/* -- MiddlewareCore ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;  /* how servers call it: core_vectorcall, with no tuple made */
    PyObject *app;
    PyObject *exclude_paths;
    /* (start, record, sums): the recorder's, set in one step so that a request's start and end
       go to the same recorder */
    PyObject *recording;
    PyObject *pending;
    Py_ssize_t flush_at;
    PyObject *flush;
    PyObject *report;
    PyObject *exemplars;
    PyObject *route_labels;
    PyObject *handler_resolver;
    PyObject *user_type_resolver;
    PyObject *exchange_type;
    PyObject *instrumentation;
    char follows_default;
    /* The last label found in route_labels, with its route and FastAPI route context: most
       requests match the route the one before matched. */
    PyObject *last_route;
    PyObject *last_context;
    PyObject *last_label;
    PyObject *dict;
    PyObject *weakrefs;
} Core;

struct Exchange {
    PyObject_HEAD
    /* The request context, as crowdmon.context.RequestContext reads it. */
    PyObject *scope;
    PyObject *entry_root_path;
    PyObject *user_type_resolver;
    PyObject *user_type;
    PyObject *endpoint;
    /* The middleware's own state. */
    PyObject *middleware;
    PyObject *method;
    PyObject *status;
    Py_ssize_t request_bytes;
    Py_ssize_t response_bytes;
    char body_complete;
    char finished;
    PyObject *server_receive;
    PyObject *server_send;
    double started;
    PyObject *token;
    /* Where the request's start was counted, so that it ends there too, whatever instrumentation
       the middleware follows by then: the middleware's (start, record, sums) as the request began
       (NULL: the middleware's at the end). */
    PyObject *recording;
};

static PyTypeObject CoreType;
static PyTypeObject ExchangeType;
typedef struct Sums Sums;
static PyTypeObject SumsType;
static int sums_add(Sums *self, PyObject *method, PyObject *handler, PyObject *status, double duration,
                    double received, double sent);
static int sums_start(Sums *self, PyObject *method);
typedef struct Exchange Exchange;
static PyObject *receiving_new(Exchange *exchange);
static PyObject *core_call(Core *self, PyObject *args, PyObject *kwargs);
static PyObject *core_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames);

/* PyObject_GetOptionalAttr (3.13) for older Pythons: 1 found, 0 not there, -1 error. */
static int
PyObject_GetOptionalAttr_compat(PyObject *object, PyObject *name, PyObject **result)
{
    *result = PyObject_GetAttr(object, name);
    if (*result != NULL) {
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* With an exception set: an Exception is reported to the middleware's ``_report(site, error)``
   and cleared (0); anything else, or a report that raises, stays set (-1). */
static int
contain(PyObject *middleware, PyObject *site)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyObject *report = NULL;
    if (middleware != NULL && PyObject_TypeCheck(middleware, &CoreType)) {
        report = ((Core *)middleware)->report;
    }
    if (report == NULL || report == Py_None) {
        Py_XDECREF(value);
        return 0;
    }
    Py_INCREF(report);
    PyObject *result = PyObject_CallFunctionObjArgs(report, site, value ? value : Py_None, NULL);
    Py_DECREF(report);
    Py_XDECREF(value);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

static int
core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->exclude_paths);
    Py_VISIT(self->recording);
    Py_VISIT(self->pending);
    Py_VISIT(self->flush);
    Py_VISIT(self->report);
    Py_VISIT(self->exemplars);
    Py_VISIT(self->route_labels);
    Py_VISIT(self->handler_resolver);
    Py_VISIT(self->user_type_resolver);
    Py_VISIT(self->exchange_type);
    Py_VISIT(self->instrumentation);
    Py_VISIT(self->last_route);
    Py_VISIT(self->last_context);
    Py_VISIT(self->last_label);
    Py_VISIT(self->dict);
    return 0;
}

static int
core_clear(Core *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->exclude_paths);
    Py_CLEAR(self->recording);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->flush);
    Py_CLEAR(self->report);
    Py_CLEAR(self->exemplars);
    Py_CLEAR(self->route_labels);
    Py_CLEAR(self->handler_resolver);
    Py_CLEAR(self->user_type_resolver);
    Py_CLEAR(self->exchange_type);
    Py_CLEAR(self->instrumentation);
    Py_CLEAR(self->last_route);
    Py_CLEAR(self->last_context);
    Py_CLEAR(self->last_label);
    Py_CLEAR(self->dict);
    return 0;
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Core *self = (Core *)PyType_GenericNew(type, args, kwargs);
    if (self != NULL) {
        self->vectorcall = core_vectorcall;
    }
    return (PyObject *)self;
}

static void
core_dealloc(Core *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The part of ``_begin`` inside its ``try``: 1 if the request is recorded (``*method`` and
   ``*entry_root_path`` set), 0 if its path is excluded, -1 with an exception set. */
/* The middleware's (start, record, sums), checked (a new reference). */
static PyObject *
recording_of(PyObject *recording)
{
    if (recording == NULL || !PyTuple_CheckExact(recording) || PyTuple_GET_SIZE(recording) != 3) {
        PyErr_SetString(PyExc_TypeError, "_recording must be a tuple (start, record, sums)");
        return NULL;
    }
    return Py_NewRef(recording);
}

static int
begin_request(Core *self, PyObject *scope, PyObject **entry_root_path, PyObject **method, PyObject **recording)
{
    PyObject *root = get_or(scope, S_root_path, Py_None);
    if (root == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(root);
    if (truth < 0) {
        Py_DECREF(root);
        return -1;
    }
    if (!truth) {
        Py_SETREF(root, Py_NewRef(EMPTY_STR));
    }
    PyObject *path = get_item(scope, S_path);
    if (path == NULL) {
        Py_DECREF(root);
        return -1;
    }
    if (truth) {
        int starts;
        if (PyUnicode_Check(path) && PyUnicode_Check(root)) {
            Py_ssize_t found = PyUnicode_Tailmatch(path, root, 0, PY_SSIZE_T_MAX, -1);
            starts = found < 0 ? -1 : (int)found;
            /* Taken off only if a "/" (or nothing) follows it, as Starlette finds the path. */
            Py_ssize_t end = PyUnicode_GET_LENGTH(root);
            if (starts > 0 && PyUnicode_GET_LENGTH(path) > end && PyUnicode_READ_CHAR(path, end) != '/') {
                starts = 0;
            }
        }
        else {
            PyObject *answer = PyObject_CallMethod(path, "startswith", "O", root);
            starts = answer == NULL ? -1 : PyObject_IsTrue(answer);
            Py_XDECREF(answer);
        }
        if (starts > 0) {
            Py_ssize_t length = PyObject_Size(root);
            PyObject *rest = length < 0 ? NULL : PySequence_GetSlice(path, length, PY_SSIZE_T_MAX);
            Py_SETREF(path, rest);
        }
        if (starts < 0 || path == NULL) {
            Py_XDECREF(path);
            Py_DECREF(root);
            return -1;
        }
    }
    if (self->exclude_paths == NULL) {
        PyErr_SetString(PyExc_AttributeError, "exclude_paths");
        Py_DECREF(path);
        Py_DECREF(root);
        return -1;
    }
    int excluded = PySequence_Contains(self->exclude_paths, path);
    Py_DECREF(path);
    if (excluded != 0) {
        Py_DECREF(root);
        return excluded < 0 ? -1 : 0;
    }
    PyObject *request_method = get_item(scope, S_method);
    if (request_method == NULL) {
        Py_DECREF(root);
        return -1;
    }
    PyObject *taken = recording_of(self->recording);
    if (taken == NULL) {
        Py_DECREF(request_method);
        Py_DECREF(root);
        return -1;
    }
    PyObject *sums = PyTuple_GET_ITEM(taken, 2);
    if (!Py_IS_TYPE(sums, &SumsType) || !sums_start((Sums *)sums, request_method)) {
        PyObject *result = PyObject_CallOneArg(PyTuple_GET_ITEM(taken, 0), request_method);
        if (result == NULL) {
            Py_DECREF(taken);
            Py_DECREF(request_method);
            Py_DECREF(root);
            return -1;
        }
        Py_DECREF(result);
    }
    *entry_root_path = root;
    *method = request_method;
    *recording = taken;
    return 1;
}

static PyObject *
core_begin(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "_begin() takes scope, receive and send (%zd given)", nargs);
        return NULL;
    }
    PyObject *scope = args[0];
    PyObject *kind = get_or(scope, S_type, Py_None);
    if (kind == NULL) {
        return NULL;
    }
    int http = equals(kind, S_http);
    Py_DECREF(kind);
    if (http <= 0) {
        return http < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (self->follows_default) {
        PyObject *current = PyDict_GetItemWithError(INSTRUMENTATION_MODULE, S_default);  /* borrowed */
        if (current == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_AttributeError, "crowdmon.instrumentation has no _default");
            }
            return NULL;
        }
        if (current != self->instrumentation) {
            PyObject *result = PyObject_CallMethodNoArgs((PyObject *)self, S_follow_the_default);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
    }
    PyObject *entry_root_path = NULL, *method = NULL, *recording = NULL;
    int recorded = begin_request(self, scope, &entry_root_path, &method, &recording);
    if (recorded < 0) {
        return contain((PyObject *)self, S_site_start) < 0 ? NULL : Py_NewRef(Py_None);
    }
    if (recorded == 0) {
        Py_RETURN_NONE;
    }
    PyTypeObject *type = (PyTypeObject *)self->exchange_type;
    if (type == NULL || !PyType_Check(type) || !PyType_IsSubtype(type, &ExchangeType)) {
        PyErr_SetString(PyExc_TypeError, "_exchange_type must be a subclass of ExchangeCore");
        Py_DECREF(entry_root_path);
        Py_DECREF(method);
        Py_DECREF(recording);
        return NULL;
    }
    Exchange *exchange = (Exchange *)type->tp_alloc(type, 0);
    if (exchange == NULL) {
        Py_DECREF(entry_root_path);
        Py_DECREF(method);
        Py_DECREF(recording);
        return NULL;
    }
    exchange->scope = Py_NewRef(scope);
    exchange->entry_root_path = entry_root_path;
    exchange->user_type_resolver = Py_NewRef(self->user_type_resolver ? self->user_type_resolver : Py_None);
    exchange->user_type = Py_NewRef(Py_None);
    exchange->endpoint = Py_NewRef(UNMATCHED_HANDLER);
    exchange->middleware = Py_NewRef((PyObject *)self);
    exchange->method = method;
    exchange->status = Py_NewRef(ZERO);
    exchange->server_receive = Py_NewRef(args[1]);
    exchange->server_send = Py_NewRef(args[2]);
    exchange->token = Py_NewRef(Py_None);
    exchange->recording = recording;
    if (now(&exchange->started) < 0) {
        Py_DECREF(exchange);
        return NULL;
    }
    PyObject *token = PyContextVar_Set(CURRENT_REQUEST, (PyObject *)exchange);
    if (token == NULL) {
        if (contain((PyObject *)self, S_site_context) < 0) {
            Py_DECREF(exchange);
            return NULL;
        }
    }
    else {
        Py_SETREF(exchange->token, token);
    }
    return (PyObject *)exchange;
}

static PyMethodDef core_methods[] = {
    {"_begin", (PyCFunction)(void (*)(void))core_begin, METH_FASTCALL,
     "The request's exchange (published as the request context), or None for a scope that is not "
     "recorded: not HTTP, or an excluded path (or a start that failed, which is reported)."},
    {NULL},
};

static PyMemberDef core_members[] = {
    {"app", T_OBJECT, offsetof(Core, app), 0, NULL},
    {"exclude_paths", T_OBJECT, offsetof(Core, exclude_paths), 0, NULL},
    {"_recording", T_OBJECT, offsetof(Core, recording), 0, NULL},
    {"_pending", T_OBJECT, offsetof(Core, pending), 0, NULL},
    {"_flush_at", T_PYSSIZET, offsetof(Core, flush_at), 0, NULL},
    {"_flush", T_OBJECT, offsetof(Core, flush), 0, NULL},
    {"_report", T_OBJECT, offsetof(Core, report), 0, NULL},
    {"_exemplars", T_OBJECT, offsetof(Core, exemplars), 0, NULL},
    {"_route_labels", T_OBJECT, offsetof(Core, route_labels), 0, NULL},
    {"handler_resolver", T_OBJECT, offsetof(Core, handler_resolver), 0, NULL},
    {"_user_type_resolver", T_OBJECT, offsetof(Core, user_type_resolver), 0, NULL},
    {"_exchange_type", T_OBJECT, offsetof(Core, exchange_type), 0, NULL},
    {"instrumentation", T_OBJECT, offsetof(Core, instrumentation), 0, NULL},
    {"_follows_default", T_BOOL, offsetof(Core, follows_default), 0, NULL},
    {NULL},
};

static PyGetSetDef core_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crowdmon._speedups.MiddlewareCore",
    .tp_doc = "Starts following a request: _begin.  Its attributes are set by the subclass.",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Core, vectorcall),
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_dictoffset = offsetof(Core, dict),
    .tp_weaklistoffset = offsetof(Core, weakrefs),
    .tp_call = (ternaryfunc)core_call,
    .tp_getset = core_getset,
};

/* -- ExchangeCore ------------------------------------------------------------------------------ */

static int
exchange_traverse(Exchange *self, visitproc visit, void *arg)
{
    Py_VISIT(self->scope);
    Py_VISIT(self->entry_root_path);
    Py_VISIT(self->user_type_resolver);
    Py_VISIT(self->user_type);
    Py_VISIT(self->endpoint);
    Py_VISIT(self->middleware);
    Py_VISIT(self->method);
    Py_VISIT(self->status);
    Py_VISIT(self->server_receive);
    Py_VISIT(self->server_send);
    Py_VISIT(self->token);
    Py_VISIT(self->recording);
    return 0;
}

static int
exchange_clear(Exchange *self)
{
    Py_CLEAR(self->scope);
    Py_CLEAR(self->entry_root_path);
    Py_CLEAR(self->user_type_resolver);
    Py_CLEAR(self->user_type);
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->method);
    Py_CLEAR(self->status);
    Py_CLEAR(self->server_receive);
    Py_CLEAR(self->server_send);
    Py_CLEAR(self->token);
    Py_CLEAR(self->recording);
    return 0;
}

static void
exchange_dealloc(Exchange *self)
{
    PyObject_GC_UnTrack(self);
    exchange_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ``declared_size`` for the header lists servers build (a list of pairs of bytes); any other
   shape goes to the Python function, which says what each odd shape counts as. */
static int
declared_size(Exchange *self, Py_ssize_t *size)
{
    PyObject *scope = self->scope;
    Py_ssize_t received = self->request_bytes;
    *size = received;
    PyObject *headers = PyDict_CheckExact(scope) ? PyDict_GetItemWithError(scope, S_headers) : NULL;
    if (headers == NULL && PyErr_Occurred()) {
        PyErr_Clear();
    }
    if (headers != NULL && (PyList_CheckExact(headers) || PyTuple_CheckExact(headers))) {
        Py_ssize_t count = PySequence_Fast_GET_SIZE(headers);
        PyObject **items = PySequence_Fast_ITEMS(headers);
        Py_ssize_t i;
        for (i = 0; i < count; i++) {
            PyObject *pair = items[i];
            if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0))) {
                break;
            }
            PyObject *name = PyTuple_GET_ITEM(pair, 0);
            if (PyBytes_GET_SIZE(name) == 14 && memcmp(PyBytes_AS_STRING(name), "content-length", 14) == 0) {
                break;
            }
        }
        if (i == count) {
            return 0;  /* most requests: no Content-Length */
        }
    }
    else if (headers == NULL && PyDict_CheckExact(scope)) {
        return 0;
    }
    PyObject *received_object = PyLong_FromSsize_t(received);
    if (received_object == NULL) {
        return -1;
    }
    PyObject *declared = PyObject_CallFunctionObjArgs(DECLARED_SIZE, scope, received_object, NULL);
    Py_DECREF(received_object);
    if (declared == NULL) {
        return -1;
    }
    *size = PyLong_AsSsize_t(declared);
    Py_DECREF(declared);
    return (*size == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* id(route), or (id(route), id(context)) with a FastAPI route context: the key of
   MiddlewareCore._route_labels (a new reference) */
static PyObject *
route_key(PyObject *route, PyObject *context)
{
    PyObject *key = PyLong_FromVoidPtr(route);
    if (key != NULL && context != Py_None) {
        PyObject *context_id = PyLong_FromVoidPtr(context);
        Py_SETREF(key, context_id == NULL ? NULL : PyTuple_Pack(2, key, context_id));
        Py_XDECREF(context_id);
    }
    return key;
}

/* The handler label of a finished request (a new reference), or NULL with an exception set. */
static PyObject *
handler_label(Exchange *self, Core *middleware)
{
    PyObject *scope = self->scope;
    PyObject *resolver = middleware->handler_resolver;
    if (resolver != NULL && resolver != Py_None) {
        Py_INCREF(resolver);
        PyObject *label = PyObject_CallOneArg(resolver, scope);
        Py_DECREF(resolver);
        if (label == NULL) {
            return NULL;
        }
        if (label != Py_None) {
            PyObject *text = PyObject_Str(label);
            Py_DECREF(label);
            return text;
        }
        Py_DECREF(label);
    }
    PyObject *route = get_or(scope, S_route, Py_None);
    if (route == NULL) {
        return NULL;
    }
    PyObject *fastapi = get_or(scope, S_fastapi, Py_None);
    if (fastapi == NULL) {
        Py_DECREF(route);
        return NULL;
    }
    PyObject *context = PyDict_CheckExact(fastapi) ? get_or(fastapi, S_effective_route_context, Py_None) : Py_NewRef(Py_None);
    Py_DECREF(fastapi);
    if (context == NULL) {
        Py_DECREF(route);
        return NULL;
    }
    PyObject *key = NULL, *stored = NULL;
    if (route == middleware->last_route && context == middleware->last_context && middleware->last_label != NULL) {
        stored = Py_NewRef(middleware->last_label);
    }
    else if ((key = route_key(route, context)) != NULL) {
        PyObject *labels = middleware->route_labels;
        if (labels != NULL && PyDict_CheckExact(labels)) {
            stored = PyDict_GetItemWithError(labels, key);
            Py_XINCREF(stored);
            if (stored != NULL) {  /* stored for these two objects, which the middleware keeps alive */
                Py_XSETREF(middleware->last_route, Py_NewRef(route));
                Py_XSETREF(middleware->last_context, Py_NewRef(context));
                Py_XSETREF(middleware->last_label, Py_NewRef(stored));
            }
        }
        else if (labels != NULL) {
            stored = PyObject_CallMethodObjArgs(labels, S_get, key, NULL);
            if (stored == Py_None) {
                Py_CLEAR(stored);
            }
        }
        else {
            PyErr_SetString(PyExc_AttributeError, "_route_labels");
        }
    }
    if (stored != NULL) {
        /* (scope.get("root_path") or "") != self.entry_root_path: a mount on the way in */
        PyObject *root = get_or(scope, S_root_path, Py_None);
        int same = -1;
        if (root != NULL) {
            int truth = PyObject_IsTrue(root);
            if (truth >= 0) {
                same = PyObject_RichCompareBool(truth ? root : EMPTY_STR, self->entry_root_path, Py_EQ);
            }
            Py_DECREF(root);
        }
        if (same <= 0) {
            Py_CLEAR(stored);
            if (same < 0) {
                Py_XDECREF(key);
                Py_DECREF(route);
                Py_DECREF(context);
                return NULL;
            }
        }
    }
    if (stored == NULL && key == NULL && !PyErr_Occurred()) {
        key = route_key(route, context);  /* the last route's, past a mount this time */
    }
    if (stored == NULL && key != NULL && !PyErr_Occurred()) {
        PyObject *call[] = {(PyObject *)middleware, scope, self->entry_root_path, self->status, route, context, key};
        stored = PyObject_VectorcallMethod(S_route_label, call, 7 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(key);
    Py_DECREF(route);
    Py_DECREF(context);
    return stored;
}

static int
exchange_finish_at(Exchange *self, double ended_at)
{
    self->finished = 1;
    set_field(&self->endpoint, UNMATCHED_HANDLER);
    PyObject *middleware_object = self->middleware;
    if (middleware_object == NULL || !PyObject_TypeCheck(middleware_object, &CoreType) || self->scope == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this exchange was not begun by a middleware");
        return -1;
    }
    Py_INCREF(middleware_object);
    Core *middleware = (Core *)middleware_object;
    int outcome = -1;
    PyObject *recording = NULL;
    PyObject *handler = handler_label(self, middleware);
    if (handler == NULL) {
        if (contain(middleware_object, S_site_handler) < 0) {
            goto done;
        }
        handler = Py_NewRef(UNMATCHED_HANDLER);
    }
    set_field(&self->endpoint, handler);
    double duration = ended_at - self->started;
    Py_ssize_t size = self->request_bytes;
    int sized = self->body_complete || declared_size(self, &size) == 0;
    recording = recording_of(self->recording != NULL ? self->recording : middleware->recording);
    if (recording == NULL) {
        Py_DECREF(handler);
        goto done;
    }
    PyObject *record = PyTuple_GET_ITEM(recording, 1), *sums = PyTuple_GET_ITEM(recording, 2);
    if (sized && sums != NULL && Py_IS_TYPE(sums, &SumsType)
        && sums_add((Sums *)sums, self->method, handler, self->status, duration, (double)size,
                    (double)self->response_bytes)) {
        if (middleware->exemplars == NULL || middleware->exemplars == Py_None) {
            Py_DECREF(handler);
            outcome = 0;
            goto done;
        }
        sized = -1;  /* added: only the exemplar is left */
    }
    PyObject *duration_object = PyFloat_FromDouble(duration);
    if (duration_object == NULL) {
        Py_DECREF(handler);
        goto done;
    }
    if (sized >= 0) {
        PyObject *entry = NULL;
        if (sized) {
            PyObject *received = PyLong_FromSsize_t(size);
            PyObject *sent = PyLong_FromSsize_t(self->response_bytes);
            if (received != NULL && sent != NULL) {
                entry = PyTuple_Pack(6, self->method, handler, self->status, duration_object, received, sent);
            }
            Py_XDECREF(received);
            Py_XDECREF(sent);
        }
        int recorded = -1;
        if (entry != NULL) {
            if (record == NULL) {
                PyErr_SetString(PyExc_AttributeError, "_record");
            }
            else {
                PyObject *result = PyObject_CallOneArg(record, entry);
                if (result != NULL) {
                    Py_DECREF(result);
                    PyObject *pending = middleware->pending;
                    Py_ssize_t waiting = pending == NULL ? 0 : (PyList_CheckExact(pending) ? PyList_GET_SIZE(pending) : PyObject_Size(pending));
                    if (waiting >= 0 && waiting >= middleware->flush_at && middleware->flush != NULL) {
                        result = PyObject_CallNoArgs(middleware->flush);
                        Py_XDECREF(result);
                        recorded = result == NULL ? -1 : 0;
                    }
                    else {
                        recorded = waiting < 0 ? -1 : 0;
                    }
                }
            }
            Py_DECREF(entry);
        }
        if (recorded < 0 && contain(middleware_object, S_site_record) < 0) {
            Py_DECREF(duration_object);
            Py_DECREF(handler);
            goto done;
        }
    }
    if (middleware->exemplars != NULL && middleware->exemplars != Py_None) {
        PyObject *call[] = {(PyObject *)self, handler, duration_object};
        PyObject *result = PyObject_VectorcallMethod(S_exemplar, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (result == NULL) {
            Py_DECREF(duration_object);
            Py_DECREF(handler);
            goto done;
        }
        Py_DECREF(result);
    }
    Py_DECREF(duration_object);
    Py_DECREF(handler);
    outcome = 0;
done:
    Py_XDECREF(recording);
    Py_DECREF(middleware_object);
    return outcome;
}

static PyObject *
exchange_finish(Exchange *self, PyObject *ended_at)
{
    double at = PyFloat_AsDouble(ended_at);
    if (at == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return exchange_finish_at(self, at) < 0 ? NULL : Py_NewRef(Py_None);
}

/* A body's size in bytes: a ``bytes`` object's own, else what ``body_size`` in _core.py says
   (a memoryview's len() counts its items); -1 with an exception set. */
static Py_ssize_t
body_size(PyObject *body)
{
    if (PyBytes_CheckExact(body)) {
        return PyBytes_GET_SIZE(body);
    }
    PyObject *size = PyObject_CallOneArg(BODY_SIZE, body);
    if (size == NULL) {
        return -1;
    }
    Py_ssize_t length = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    return length;
}

static int
status_is_set(PyObject *status)
{
    return status == ZERO ? 0 : PyObject_IsTrue(status);
}

static PyObject *
exchange_receive(Exchange *self, PyObject *Py_UNUSED(ignored))
{
    /* Past the body and the response's start, the server's own receive (see _core.py). */
    if (self->body_complete && status_is_set(self->status) > 0) {
        PyObject *receive = Py_NewRef(self->server_receive);
        PyObject *result = PyObject_CallNoArgs(receive);
        Py_DECREF(receive);
        return result;
    }
    return receiving_new(self);
}

/* The part of ``send`` inside its ``try``: 0 to pass the message on, 1 with ``*answer`` set
   (the 5xx path), -1 with an exception set. */
static int
follow_send(Exchange *self, PyObject *message, PyObject **answer)
{
    PyObject *kind = get_item(message, S_type);
    if (kind == NULL) {
        return -1;
    }
    int outcome = 0;
    int is = equals(kind, S_response_body);
    if (is > 0) {
        int started = status_is_set(self->status);
        if (started > 0) {
            PyObject *body = get_or(message, S_body, EMPTY_BYTES);
            Py_ssize_t length = body == NULL ? -1 : body_size(body);
            Py_XDECREF(body);
            if (length < 0) {
                outcome = -1;
            }
            else {
                self->response_bytes += length;
                PyObject *more = get_or(message, S_more_body, Py_False);
                int more_body = more == NULL ? -1 : PyObject_IsTrue(more);
                Py_XDECREF(more);
                double at;
                if (more_body < 0) {
                    outcome = -1;
                }
                else if (!more_body && !self->finished) {
                    outcome = (now(&at) < 0 || exchange_finish_at(self, at) < 0) ? -1 : 0;
                }
            }
        }
        else if (started < 0) {
            outcome = -1;
        }
    }
    else if (is == 0 && (is = equals(kind, S_response_start)) > 0) {
        int started = status_is_set(self->status);
        if (started == 0) {  /* else the client left before it: 499 */
            PyObject *status = get_item(message, S_status);
            long code = 0;
            if (status != NULL && PyLong_CheckExact(status)) {
                int overflow;
                code = PyLong_AsLongAndOverflow(status, &overflow);
            }
            if (status != NULL && (code < 100 || code > 599)) {
                /* Not a plain int from 100 to 599: odd_status in _core.py says what it records as. */
                Py_SETREF(status, PyObject_CallOneArg(ODD_STATUS, status));
                code = status != NULL && PyLong_CheckExact(status) ? PyLong_AsLong(status) : 0;
            }
            if (status == NULL) {
                outcome = -1;
            }
            else {
                Py_SETREF(self->status, status);
                if (code >= 500 && self->body_complete) {
                    *answer = PyObject_CallMethodOneArg((PyObject *)self, S_start_error, message);
                    outcome = *answer == NULL ? -1 : 1;
                }
            }
        }
        else if (started < 0) {
            outcome = -1;
        }
    }
    else if (is == 0 && ((is = equals(kind, S_response_pathsend)) > 0
                         || (is == 0 && (is = equals(kind, S_response_zerocopysend)) > 0))) {
        int started = status_is_set(self->status);
        if (started > 0 && !self->finished) {
            PyObject *name = equals(kind, S_response_pathsend) > 0 ? S_pathsend : S_zerocopysend;
            PyObject *result = PyObject_CallMethodOneArg((PyObject *)self, name, message);
            Py_XDECREF(result);
            outcome = result == NULL ? -1 : 0;
        }
        else if (started < 0) {
            outcome = -1;
        }
    }
    if (is < 0) {
        outcome = -1;
    }
    Py_DECREF(kind);
    return outcome;
}

static PyObject *
exchange_send(Exchange *self, PyObject *message)
{
    PyObject *answer = NULL;
    int outcome = follow_send(self, message, &answer);
    if (outcome > 0) {
        return answer;
    }
    if (outcome < 0 && contain(self->middleware, S_site_send) < 0) {
        return NULL;
    }
    PyObject *send = Py_NewRef(self->server_send);
    PyObject *result = PyObject_CallOneArg(send, message);
    Py_DECREF(send);
    return result;
}

static PyObject *
exchange_end(Exchange *self, PyObject *Py_UNUSED(ignored))
{
    int failed = 0;
    if (!self->finished) {
        int started = status_is_set(self->status);
        if (started == 0) {
            set_field(&self->status, STATUS_500);
        }
        double at;
        failed = started < 0 || now(&at) < 0 || exchange_finish_at(self, at) < 0;
    }
    /* Let go of the request, whatever happened above; a failure is raised afterwards. */
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    if (failed) {
        PyErr_Fetch(&type, &value, &traceback);
    }
    Py_XSETREF(self->scope, Py_NewRef(Py_None));
    set_field(&self->server_receive, RECEIVE_AFTER_THE_END);
    set_field(&self->server_send, SEND_AFTER_THE_END);
    PyObject *token = self->token;
    self->token = Py_NewRef(Py_None);
    if (token != NULL && token != Py_None) {
        /* A ValueError: the request is ended from another context than the one it was published
           in (its coroutine closed by the garbage collector), which has nothing of it to reset. */
        if (PyContextVar_Reset(CURRENT_REQUEST, token) < 0) {
            if (failed || PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();  /* failed: the first failure is the one raised */
            }
            else if ((failed = contain(self->middleware, S_site_context) < 0)) {
                PyErr_Fetch(&type, &value, &traceback);
            }
        }
    }
    Py_XDECREF(token);
    if (failed) {
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef exchange_methods[] = {
    {"receive", (PyCFunction)exchange_receive, METH_NOARGS, "The app's receive."},
    {"send", (PyCFunction)exchange_send, METH_O, "The app's send: passes the server's awaitable on."},
    {"finish", (PyCFunction)exchange_finish, METH_O, "Record the request. Runs once."},
    {"end", (PyCFunction)exchange_end, METH_NOARGS, "The request is over: record it if no response did, then let go of it."},
    {NULL},
};

static PyMemberDef exchange_members[] = {
    {"request_bytes", T_PYSSIZET, offsetof(Exchange, request_bytes), 0, NULL},
    {"response_bytes", T_PYSSIZET, offsetof(Exchange, response_bytes), 0, NULL},
    {"body_complete", T_BOOL, offsetof(Exchange, body_complete), 0, NULL},
    {"finished", T_BOOL, offsetof(Exchange, finished), 0, NULL},
    {"started", T_DOUBLE, offsetof(Exchange, started), 0, NULL},
    {NULL},
};

/* The object fields, as attributes that can be set but not deleted: the request path reads
   them without checking for NULL. */
static PyObject *
field_get(PyObject *self, void *offset)
{
    PyObject *value = *(PyObject **)((char *)self + (Py_ssize_t)offset);
    return Py_NewRef(value != NULL ? value : Py_None);
}

static int
field_set(PyObject *self, PyObject *value, void *offset)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the attributes of crowdmon's request cannot be deleted");
        return -1;
    }
    Py_XSETREF(*(PyObject **)((char *)self + (Py_ssize_t)offset), Py_NewRef(value));
    return 0;
}

static PyGetSetDef exchange_getset[] = {
    {"scope", field_get, field_set, NULL, (void *)offsetof(Exchange, scope)},
    {"entry_root_path", field_get, field_set, NULL, (void *)offsetof(Exchange, entry_root_path)},
    {"user_type_resolver", field_get, field_set, NULL, (void *)offsetof(Exchange, user_type_resolver)},
    {"_user_type", field_get, field_set, NULL, (void *)offsetof(Exchange, user_type)},
    {"_endpoint", field_get, field_set, NULL, (void *)offsetof(Exchange, endpoint)},
    {"middleware", field_get, field_set, NULL, (void *)offsetof(Exchange, middleware)},
    {"method", field_get, field_set, NULL, (void *)offsetof(Exchange, method)},
    {"status", field_get, field_set, NULL, (void *)offsetof(Exchange, status)},
    {"server_receive", field_get, field_set, NULL, (void *)offsetof(Exchange, server_receive)},
    {"server_send", field_get, field_set, NULL, (void *)offsetof(Exchange, server_send)},
    {"_token", field_get, field_set, NULL, (void *)offsetof(Exchange, token)},
    {NULL},
};

/* A new exchange with every object field set: None, a status of 0, an empty root path. */
static PyObject *
exchange_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    Exchange *self = (Exchange *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    PyObject **fields[] = {&self->scope, &self->user_type_resolver, &self->user_type, &self->endpoint,
                           &self->middleware, &self->method, &self->server_receive, &self->server_send,
                           &self->token};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        *fields[i] = Py_NewRef(Py_None);
    }
    self->entry_root_path = Py_NewRef(EMPTY_STR);
    self->status = Py_NewRef(ZERO);
    return (PyObject *)self;
}

static PyTypeObject ExchangeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crowdmon._speedups.ExchangeCore",
    .tp_doc = "One request as the middleware follows it.",
    .tp_basicsize = sizeof(Exchange),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = exchange_new,
    .tp_getset = exchange_getset,
    .tp_dealloc = (destructor)exchange_dealloc,
    .tp_traverse = (traverseproc)exchange_traverse,
    .tp_clear = (inquiry)exchange_clear,
    .tp_methods = exchange_methods,
    .tp_members = exchange_members,
};

/* -- the middleware's call: an awaitable of its own ---------------------------------------------- */

/* What ``await middleware(scope, receive, send)`` runs: crowdmon/_core.py's
   ``MiddlewareCore.__call__``, as an object that drives the app's awaitable itself instead of a
   coroutine frame.  Nothing happens until it is first sent to, as with a coroutine; then the
   request is begun and the app called with the exchange's receive and send.  When the app
   returns, a request that started a response is ended here; a request that did not, or an app
   that raised before a response started, is handed to the exchange's Python ``_conclude``
   coroutine (which may have to ask the server whether the client left), and that is driven to
   its end instead.  It is registered as a collections.abc.Coroutine (asyncio.create_task takes
   it) and has send, throw and close like one. */

enum { CALL_NEW, CALL_APP, CALL_CONCLUDING, CALL_DONE };

/* What the compiled awaitables (the call, and receive while the body arrives) share: where they
   are, and what they are awaiting. */
/* One awaitable's own send, throw and close, which the shared ones below call. */
typedef struct Steps {
    PySendResult (*send)(PyObject *self, PyObject *value, PyObject **result);
    PyObject *(*throw)(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
    PyObject *(*close)(PyObject *self);
} Steps;

#define AWAITING_HEAD \
    PyObject_HEAD \
    const Steps *steps; \
    int state; \
    int running;  /* in a send, throw or close: another one now is refused, as a coroutine does */ \
    PyObject *inner;

typedef struct {
    AWAITING_HEAD
} Awaiting;

typedef struct {
    AWAITING_HEAD                      /* inner: the app's awaitable, then _conclude's */
    PyObject *middleware;
    PyObject *scope, *receive, *send;  /* until it starts */
    PyObject *exchange;                /* NULL for a scope that is not recorded */
} Call;

static PyTypeObject CallType;
static PyObject *S_conclude, *S_throw, *S_close;
/* The exchange's receive and send, bound without looking them up on each request. */
static PyMethodDef receive_def = {"receive", (PyCFunction)exchange_receive, METH_NOARGS, NULL};
static PyMethodDef send_def = {"send", (PyCFunction)exchange_send, METH_O, NULL};

static int
call_traverse(Call *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->scope);
    Py_VISIT(self->receive);
    Py_VISIT(self->send);
    Py_VISIT(self->exchange);
    Py_VISIT(self->inner);
    return 0;
}

static int
call_clear(Call *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
    Py_CLEAR(self->exchange);
    Py_CLEAR(self->inner);
    return 0;
}

/* The iterator ``await value`` drives (a new reference), as the interpreter finds it. */
static PyObject *
awaitable_iterator(PyObject *value)
{
    if (PyCoro_CheckExact(value)) {
        return Py_NewRef(value);
    }
    PyTypeObject *type = Py_TYPE(value);
    if (type->tp_as_async != NULL && type->tp_as_async->am_await != NULL) {
        PyObject *iterator = type->tp_as_async->am_await(value);
        if (iterator == NULL) {
            return NULL;
        }
        if (PyCoro_CheckExact(iterator) || !PyIter_Check(iterator)) {
            PyErr_Format(PyExc_TypeError, "__await__() returned %s of type '%.100s'",
                         PyCoro_CheckExact(iterator) ? "a coroutine" : "non-iterator", Py_TYPE(iterator)->tp_name);
            Py_DECREF(iterator);
            return NULL;
        }
        return iterator;
    }
    if (PyGen_CheckExact(value)) {  /* a generator made a coroutine by types.coroutine */
        PyObject *code = PyObject_GetAttrString(value, "gi_code");
        PyObject *flags = code == NULL ? NULL : PyObject_GetAttrString(code, "co_flags");
        long bits = flags == NULL ? -1 : PyLong_AsLong(flags);
        Py_XDECREF(code);
        Py_XDECREF(flags);
        if (bits == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (bits & CO_ITERABLE_COROUTINE) {
            return Py_NewRef(value);
        }
    }
    PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression", type->tp_name);
    return NULL;
}

/* Hand the request to ``exchange._conclude(error)`` (error is NULL or a new reference, taken). */
static int
call_conclude(Call *self, PyObject *error)
{
    PyObject *conclusion = PyObject_CallMethodOneArg(self->exchange, S_conclude, error ? error : Py_None);
    Py_XDECREF(error);
    if (conclusion == NULL) {
        return -1;
    }
    Py_XSETREF(self->inner, conclusion);
    self->state = CALL_CONCLUDING;
    return 0;
}

/* The exception being raised, normalised and with its traceback (a new reference). */
static PyObject *
fetch_error(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

static PyObject *exchange_end(Exchange *self, PyObject *Py_UNUSED(ignored));

/* Raise ``error`` again (a reference, taken) as it was: its traceback and its __context__ kept,
   as a bare ``raise`` does. */
static void
restore_error(PyObject *error)
{
    if (error == NULL) {
        return;
    }
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, PyException_GetTraceback(error));
}

/* ``exchange.end()`` with ``error`` (a new reference, taken) raised afterwards; an error of
   end's own wins, with ``error`` as its context, as in a ``finally`` block. */
static void
end_then_raise(Call *self, PyObject *error)
{
    if (error == NULL) {
        error = PyObject_CallOneArg(PyExc_SystemError, S_conclude);  /* an error without an exception */
    }
    PyObject *ended = exchange_end((Exchange *)self->exchange, NULL);
    if (ended == NULL) {
        PyObject *own = fetch_error();
        if (own != NULL && error != NULL) {
            PyException_SetContext(own, error);
            error = NULL;
        }
        Py_XDECREF(error);
        restore_error(own);
        return;
    }
    Py_DECREF(ended);
    restore_error(error);
}

/* What comes of a step of ``inner``: the request ended or handed on, as the Python core does. */
static PySendResult
call_after(Call *self, PySendResult status, PyObject **result)
{
    for (;;) {
        if (status == PYGEN_NEXT) {
            return PYGEN_NEXT;
        }
        if (self->state != CALL_APP || self->exchange == NULL) {
            self->state = CALL_DONE;
            Py_CLEAR(self->inner);
            if (status == PYGEN_RETURN) {
                Py_SETREF(*result, Py_NewRef(Py_None));
            }
            return status;
        }
        Exchange *exchange = (Exchange *)self->exchange;
        PyObject *error = status == PYGEN_ERROR ? fetch_error() : NULL;
        if (status == PYGEN_ERROR && error == NULL) {
            error = PyObject_CallOneArg(PyExc_SystemError, S_conclude);  /* an error without an exception */
        }
        int answered = exchange->status == ZERO ? 0 : PyObject_IsTrue(exchange->status);
        if (answered < 0) {
            PyErr_Clear();  /* not a status crowdmon or the app sets: the request is answered */
            answered = 1;
        }
        if (status == PYGEN_RETURN) {
            Py_CLEAR(*result);
            if (answered) {
                self->state = CALL_DONE;
                Py_CLEAR(self->inner);
                PyObject *ended = exchange_end(exchange, NULL);
                if (ended == NULL) {
                    return PYGEN_ERROR;
                }
                Py_DECREF(ended);
                *result = Py_NewRef(Py_None);
                return PYGEN_RETURN;
            }
            if (call_conclude(self, NULL) < 0) {
                self->state = CALL_DONE;
                end_then_raise(self, fetch_error());
                return PYGEN_ERROR;
            }
        }
        else {
            if (answered) {
                self->state = CALL_DONE;
                Py_CLEAR(self->inner);
                end_then_raise(self, error);
                return PYGEN_ERROR;
            }
            if (call_conclude(self, error) < 0) {
                self->state = CALL_DONE;
                end_then_raise(self, fetch_error());
                return PYGEN_ERROR;
            }
        }
        status = PyIter_Send(self->inner, Py_None, result);
    }
}

/* The first step: begin the request and call the app. */
static PySendResult
call_start(Call *self, PyObject **result)
{
    PyObject *scope = self->scope, *receive = self->receive, *send = self->send;
    self->scope = self->receive = self->send = NULL;
    Core *middleware = (Core *)self->middleware;
    PyObject *args[3] = {scope, receive, send};
    PyObject *exchange = core_begin(middleware, args, 3);
    PySendResult status = PYGEN_ERROR;
    if (exchange == NULL) {
        self->state = CALL_DONE;  /* raised before the request began, as the Python core does */
        goto done;
    }
    self->state = CALL_APP;
    PyObject *app = middleware->app;
    if (app == NULL) {
        PyErr_SetString(PyExc_AttributeError, "app");
        Py_DECREF(exchange);
        self->state = CALL_DONE;
        goto done;
    }
    Py_INCREF(app);
    PyObject *awaitable;
    if (exchange == Py_None) {
        Py_DECREF(exchange);
        awaitable = PyObject_Vectorcall(app, args, 3, NULL);
    }
    else {
        self->exchange = exchange;
        PyObject *app_receive = PyCFunction_New(&receive_def, exchange);
        PyObject *app_send = PyCFunction_New(&send_def, exchange);
        PyObject *app_args[3] = {scope, app_receive, app_send};
        awaitable = (app_receive == NULL || app_send == NULL) ? NULL : PyObject_Vectorcall(app, app_args, 3, NULL);
        Py_XDECREF(app_receive);
        Py_XDECREF(app_send);
    }
    Py_DECREF(app);
    if (awaitable != NULL) {
        self->inner = awaitable_iterator(awaitable);
        Py_DECREF(awaitable);
    }
    if (self->inner == NULL) {
        status = call_after(self, PYGEN_ERROR, result);
        goto done;
    }
    status = call_after(self, PyIter_Send(self->inner, Py_None, result), result);
done:
    Py_DECREF(scope);
    Py_DECREF(receive);
    Py_DECREF(send);
    return status;
}

static PySendResult
call_am_send_step(Call *self, PyObject *value, PyObject **result)
{
    *result = NULL;
    switch (self->state) {
    case CALL_NEW:
        if (value != Py_None) {
            PyErr_SetString(PyExc_TypeError, "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        return call_start(self, result);
    case CALL_DONE:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    default:
        return call_after(self, PyIter_Send(self->inner, value, result), result);
    }
}

/* A step's outcome as Python's send and __next__ give it. */
static PyObject *
call_result(PySendResult status, PyObject *result, int stop_with_value)
{
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        if (stop_with_value) {
            if (result == Py_None) {
                PyErr_SetNone(PyExc_StopIteration);
            }
            else {
                PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
                if (stop != NULL) {
                    PyErr_SetObject(PyExc_StopIteration, stop);
                    Py_DECREF(stop);
                }
            }
        }
        Py_DECREF(result);
    }
    return NULL;
}

/* send and __next__ of the compiled awaitables, through their type's am_send. */
static PyObject *
awaiting_send(PyObject *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = Py_TYPE(self)->tp_as_async->am_send(self, value, &result);
    return call_result(status, result, 1);
}

static PyObject *
awaiting_next(PyObject *self)
{
    PyObject *result;
    PySendResult status = Py_TYPE(self)->tp_as_async->am_send(self, Py_None, &result);
    return call_result(status, result, 1);  /* a value, as StopIteration's: a tracer awaits through here */
}

/* Raise what throw() was given: an exception instance, or a type with an optional value. */
static void
raise_thrown(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *kind = args[0];
    if (PyExceptionInstance_Check(kind)) {
        PyErr_SetObject((PyObject *)Py_TYPE(kind), kind);
    }
    else if (PyExceptionClass_Check(kind)) {
        PyErr_SetObject(kind, nargs > 1 ? args[1] : NULL);
    }
    else {
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
    }
}

/* The value a StopIteration being raised carries (a new reference), and the error cleared; as
   the interpreter reads it, without making an exception object where there is none. */
static PyObject *
stop_value(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *result;
    if (value == NULL) {
        result = Py_NewRef(Py_None);
    }
    else if (PyObject_TypeCheck(value, (PyTypeObject *)PyExc_StopIteration)) {
        result = PyObject_GetAttrString(value, "value");
    }
    else if (type == PyExc_StopIteration && !PyTuple_Check(value)) {
        result = Py_NewRef(value);
    }
    else {
        PyErr_NormalizeException(&type, &value, &traceback);
        result = value == NULL ? NULL : PyObject_GetAttrString(value, "value");
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return result;
}

/* ``inner.throw(*args)`` as a step: the value it yields (NEXT), the value it returned (RETURN),
   or its error.  An iterator without ``throw`` has the exception raised where it waits. */
static PySendResult
delegate_throw(PyObject *inner, PyObject *const *args, Py_ssize_t nargs, PyObject **result)
{
    *result = NULL;
    if (PyErr_GivenExceptionMatches(args[0], PyExc_GeneratorExit)) {
        /* As a coroutine delegating with ``await`` does: the inner one is closed, and the
           GeneratorExit raised here, whatever the inner one made of it. */
        PyObject *close = NULL;
        if (PyObject_GetOptionalAttr_compat(inner, S_close, &close) < 0) {
            return PYGEN_ERROR;
        }
        if (close != NULL) {
            PyObject *closed = PyObject_CallNoArgs(close);
            Py_DECREF(close);
            if (closed == NULL) {
                return PYGEN_ERROR;
            }
            Py_DECREF(closed);
        }
        raise_thrown(args, nargs);
        return PYGEN_ERROR;
    }
    if (PyCoro_CheckExact(inner) || PyGen_CheckExact(inner)) {
        PyObject *call[4] = {inner, args[0], nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL};
        *result = PyObject_VectorcallMethod(S_throw, call, (size_t)(1 + nargs), NULL);
    }
    else {
        PyObject *throw = NULL;
        if (PyObject_GetOptionalAttr_compat(inner, S_throw, &throw) < 0) {
            return PYGEN_ERROR;
        }
        if (throw == NULL) {
            raise_thrown(args, nargs);
            return PYGEN_ERROR;
        }
        *result = PyObject_Vectorcall(throw, args, (size_t)nargs, NULL);
        Py_DECREF(throw);
    }
    if (*result != NULL) {
        return PYGEN_NEXT;
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        *result = stop_value();
        return *result == NULL ? PYGEN_ERROR : PYGEN_RETURN;
    }
    return PYGEN_ERROR;
}

static PyObject *
call_throw_step(Call *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->state == CALL_NEW) {
        /* a coroutine not started raises it and is done */
        self->state = CALL_DONE;
        call_clear(self);
        raise_thrown(args, nargs);
        return NULL;
    }
    PyObject *result = NULL;
    PySendResult status = delegate_throw(self->inner, args, nargs, &result);
    status = call_after(self, status, &result);
    return call_result(status, result, 1);
}

static PyObject *
call_close_step(Call *self)
{
    if (self->state == CALL_NEW || self->state == CALL_DONE) {
        self->state = CALL_DONE;
        call_clear(self);
        Py_RETURN_NONE;
    }
    PyObject *close = NULL, *error = NULL;
    if (PyObject_GetOptionalAttr_compat(self->inner, S_close, &close) < 0) {
        error = fetch_error();
    }
    else if (close != NULL) {
        PyObject *closed = PyObject_CallNoArgs(close);
        Py_DECREF(close);
        if (closed == NULL) {
            error = fetch_error();
        }
        Py_XDECREF(closed);
    }
    int ending = self->state == CALL_APP && self->exchange != NULL;
    self->state = CALL_DONE;
    Py_CLEAR(self->inner);
    if (ending) {
        /* GeneratorExit reached the middleware: a request with no response is a 500 */
        if (error != NULL) {
            end_then_raise(self, error);
            return NULL;
        }
        PyObject *ended = exchange_end((Exchange *)self->exchange, NULL);
        if (ended == NULL) {
            return NULL;
        }
        Py_DECREF(ended);
        Py_RETURN_NONE;
    }
    if (error != NULL) {
        restore_error(error);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* A compiled awaitable dropped while it waits is closed, as a coroutine is. */
static void
awaiting_finalize(PyObject *self)
{
    int state = ((Awaiting *)self)->state;
    if (state != CALL_APP && state != CALL_CONCLUDING) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *closed = PyObject_CallMethodNoArgs(self, S_close);
    if (closed == NULL) {
        PyErr_WriteUnraisable(self);
    }
    Py_XDECREF(closed);
    PyErr_Restore(type, value, traceback);
}

static void
awaiting_dealloc(PyObject *self)
{
    if (PyObject_CallFinalizerFromDealloc(self) < 0) {
        return;  /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    Py_TYPE(self)->tp_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *
call_await(Call *self)
{
    return Py_NewRef((PyObject *)self);
}

/* What both compiled awaitables are: each step refused while another runs, then their own. */
static PySendResult
awaiting_am_send(PyObject *self, PyObject *value, PyObject **result)
{
    Awaiting *awaiting = (Awaiting *)self;
    if (awaiting->running) {
        *result = NULL;
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return PYGEN_ERROR;
    }
    awaiting->running = 1;
    PySendResult status = awaiting->steps->send(self, value, result);
    awaiting->running = 0;
    return status;
}

static PyObject *
awaiting_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Awaiting *awaiting = (Awaiting *)self;
    if (awaiting->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return NULL;
    }
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    if (awaiting->state == CALL_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return NULL;
    }
    awaiting->running = 1;
    PyObject *result = awaiting->steps->throw(self, args, nargs);
    awaiting->running = 0;
    return result;
}

static PyObject *
awaiting_close(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    Awaiting *awaiting = (Awaiting *)self;
    if (awaiting->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return NULL;
    }
    awaiting->running = 1;
    PyObject *result = awaiting->steps->close(self);
    awaiting->running = 0;
    return result;
}

static PyMethodDef awaiting_methods[] = {
    {"send", (PyCFunction)awaiting_send, METH_O, "Resume it with a value, as coroutine.send."},
    {"throw", (PyCFunction)(void (*)(void))awaiting_throw, METH_FASTCALL, "Raise an exception in it, as coroutine.throw."},
    {"close", (PyCFunction)awaiting_close, METH_NOARGS, "Close it, as coroutine.close."},
    {NULL},
};

static PyAsyncMethods awaiting_async = {
    .am_await = (unaryfunc)call_await,
    .am_send = (sendfunc)awaiting_am_send,
};

static const Steps call_steps = {
    (PySendResult (*)(PyObject *, PyObject *, PyObject **))call_am_send_step,
    (PyObject *(*)(PyObject *, PyObject *const *, Py_ssize_t))call_throw_step,
    (PyObject *(*)(PyObject *))call_close_step,
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crowdmon._speedups.MiddlewareCall",
    .tp_doc = "await middleware(scope, receive, send): the request, followed.",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = awaiting_dealloc,
    .tp_finalize = awaiting_finalize,
    .tp_traverse = (traverseproc)call_traverse,
    .tp_clear = (inquiry)call_clear,
    .tp_as_async = &awaiting_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = awaiting_next,
    .tp_methods = awaiting_methods,
};

/* -- the app's receive while the body is arriving ------------------------------------------------ */

/* What ``exchange.receive()`` returns until the request body is complete: the server's receive,
   awaited, and its message counted; ``_receive_body`` in crowdmon/middleware.py is the same in
   Python.  Like a coroutine it calls the server's receive only when first sent to. */

typedef struct {
    AWAITING_HEAD
    PyObject *exchange;
} Receiving;

static PyTypeObject ReceivingType;
static PyObject *S_http_request, *S_http_disconnect, *S_site_receive, *STATUS_499;

static int
receiving_traverse(Receiving *self, visitproc visit, void *arg)
{
    Py_VISIT(self->exchange);
    Py_VISIT(self->inner);
    return 0;
}

static int
receiving_clear(Receiving *self)
{
    Py_CLEAR(self->exchange);
    Py_CLEAR(self->inner);
    return 0;
}

/* The part of ``_receive_body`` inside its ``try``. */
static int
follow_receive(Exchange *exchange, PyObject *message)
{
    PyObject *kind = get_item(message, S_type);
    if (kind == NULL) {
        return -1;
    }
    int outcome = 0;
    int is = equals(kind, S_http_request);
    if (is > 0) {
        PyObject *body = get_or(message, S_body, EMPTY_BYTES);
        Py_ssize_t length = body == NULL ? -1 : body_size(body);
        Py_XDECREF(body);
        if (length < 0) {
            outcome = -1;
        }
        else {
            exchange->request_bytes += length;
            PyObject *more = get_or(message, S_more_body, Py_False);
            int more_body = more == NULL ? -1 : PyObject_IsTrue(more);
            Py_XDECREF(more);
            if (more_body < 0) {
                outcome = -1;
            }
            else if (!more_body) {
                exchange->body_complete = 1;
            }
        }
    }
    else if (is == 0 && (is = equals(kind, S_http_disconnect)) > 0) {
        /* No more body will come: the request's size is what arrived.  Gone before any response
           was started is a 499, whatever response is started later. */
        exchange->body_complete = 1;
        int started = status_is_set(exchange->status);
        if (started == 0) {
            set_field(&exchange->status, STATUS_499);
        }
        outcome = started < 0 ? -1 : 0;
    }
    if (is < 0) {
        outcome = -1;
    }
    Py_DECREF(kind);
    return outcome;
}

static PySendResult
receiving_after(Receiving *self, PySendResult status, PyObject **result)
{
    if (status == PYGEN_NEXT) {
        return PYGEN_NEXT;
    }
    self->state = CALL_DONE;
    Py_CLEAR(self->inner);
    if (status == PYGEN_RETURN) {
        Exchange *exchange = (Exchange *)self->exchange;
        if (follow_receive(exchange, *result) < 0 && contain(exchange->middleware, S_site_receive) < 0) {
            Py_CLEAR(*result);
            return PYGEN_ERROR;
        }
    }
    return status;
}

static PySendResult
receiving_am_send_step(Receiving *self, PyObject *value, PyObject **result)
{
    *result = NULL;
    if (self->state == CALL_NEW) {
        if (value != Py_None) {
            PyErr_SetString(PyExc_TypeError, "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        self->state = CALL_APP;
        PyObject *receive = Py_NewRef(((Exchange *)self->exchange)->server_receive);
        PyObject *awaitable = PyObject_CallNoArgs(receive);
        Py_DECREF(receive);
        self->inner = awaitable == NULL ? NULL : awaitable_iterator(awaitable);
        Py_XDECREF(awaitable);
        if (self->inner == NULL) {
            return receiving_after(self, PYGEN_ERROR, result);
        }
    }
    else if (self->state == CALL_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
    return receiving_after(self, PyIter_Send(self->inner, value, result), result);
}

static PyObject *
receiving_throw_step(Receiving *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->state == CALL_NEW) {
        self->state = CALL_DONE;
        receiving_clear(self);
        raise_thrown(args, nargs);
        return NULL;
    }
    PyObject *result = NULL;
    PySendResult status = receiving_after(self, delegate_throw(self->inner, args, nargs, &result), &result);
    return call_result(status, result, 1);
}

static PyObject *
receiving_close_step(Receiving *self)
{
    PyObject *inner = self->state == CALL_APP ? self->inner : NULL;
    self->inner = NULL;
    self->state = CALL_DONE;
    if (inner == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *close = NULL;
    int found = PyObject_GetOptionalAttr_compat(inner, S_close, &close);
    Py_DECREF(inner);
    if (found <= 0) {
        return found < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *closed = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    return closed;
}

static const Steps receiving_steps = {
    (PySendResult (*)(PyObject *, PyObject *, PyObject **))receiving_am_send_step,
    (PyObject *(*)(PyObject *, PyObject *const *, Py_ssize_t))receiving_throw_step,
    (PyObject *(*)(PyObject *))receiving_close_step,
};

static PyTypeObject ReceivingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crowdmon._speedups.MiddlewareReceive",
    .tp_doc = "await receive() while the request body arrives: the server's message, counted.",
    .tp_basicsize = sizeof(Receiving),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = awaiting_dealloc,
    .tp_finalize = awaiting_finalize,
    .tp_traverse = (traverseproc)receiving_traverse,
    .tp_clear = (inquiry)receiving_clear,
    .tp_as_async = &awaiting_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = awaiting_next,
    .tp_methods = awaiting_methods,
};

static PyObject *
receiving_new(Exchange *exchange)
{
    Receiving *self = PyObject_GC_New(Receiving, &ReceivingType);
    if (self == NULL) {
        return NULL;
    }
    self->exchange = Py_NewRef((PyObject *)exchange);
    self->inner = NULL;
    self->state = CALL_NEW;
    self->running = 0;
    self->steps = &receiving_steps;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
call_new(Core *middleware, PyObject *scope, PyObject *receive, PyObject *send)
{
    Call *call = PyObject_GC_New(Call, &CallType);
    if (call == NULL) {
        return NULL;
    }
    call->middleware = Py_NewRef((PyObject *)middleware);
    call->scope = Py_NewRef(scope);
    call->receive = Py_NewRef(receive);
    call->send = Py_NewRef(send);
    call->exchange = NULL;
    call->inner = NULL;
    call->state = CALL_NEW;
    call->running = 0;
    call->steps = &call_steps;
    PyObject_GC_Track(call);
    return (PyObject *)call;
}

static PyObject *
core_call(Core *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"scope", "receive", "send", NULL};
    PyObject *scope, *receive, *send;
    if (kwargs == NULL && PyTuple_GET_SIZE(args) == 3) {
        scope = PyTuple_GET_ITEM(args, 0);
        receive = PyTuple_GET_ITEM(args, 1);
        send = PyTuple_GET_ITEM(args, 2);
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:__call__", names, &scope, &receive, &send)) {
        return NULL;
    }
    return call_new(self, scope, receive, send);
}

/* The call as servers make it, three arguments in place; anything else, and a subclass that
   has a __call__ of its own since (which Python before 3.12 does not tell vectorcall about),
   takes the type's tp_call. */
static PyObject *
core_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    ternaryfunc call = Py_TYPE(callable)->tp_call;
    if (nargs == 3 && kwnames == NULL && call == (ternaryfunc)core_call) {
        return call_new((Core *)callable, args[0], args[1], args[2]);
    }
    if (call == NULL) {
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not callable", Py_TYPE(callable)->tp_name);
        return NULL;
    }
    PyObject *positional = PyTuple_New(nargs);
    PyObject *named = NULL;
    if (positional == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(positional, i, Py_NewRef(args[i]));
    }
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        named = PyDict_New();
        for (Py_ssize_t i = 0; named != NULL && i < PyTuple_GET_SIZE(kwnames); i++) {
            if (PyDict_SetItem(named, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                Py_CLEAR(named);
            }
        }
        if (named == NULL) {
            Py_DECREF(positional);
            return NULL;
        }
    }
    PyObject *result = call(callable, positional, named);
    Py_DECREF(positional);
    Py_XDECREF(named);
    return result;
}

/* take_vectorcall(cls): a subclass of MiddlewareCore is called through core_vectorcall.  Python
   3.12 and later pass the flag on to subclasses that keep the inherited __call__ themselves;
   before 3.12 only a static type keeps it. */
static PyObject *
take_vectorcall(PyObject *Py_UNUSED(module), PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &CoreType)) {
        PyErr_SetString(PyExc_TypeError, "take_vectorcall() takes a subclass of MiddlewareCore");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    if (type->tp_call == (ternaryfunc)core_call) {
        type->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
    }
    Py_RETURN_NONE;
}

/* -- the numbers of finished requests ----------------------------------------------------------- */

/* The index of the first bound a value is not above (Prometheus's "le"), len(bounds) for +Inf. */
static Py_ssize_t
bucket_of(double value, const double *bounds, Py_ssize_t count)
{
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (bounds[middle] < value) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
    }
    return low;
}

static int
add_to_cell(PyObject *cells, Py_ssize_t index, double amount)
{
    PyObject *old = PyList_GET_ITEM(cells, index);
    if (!PyFloat_CheckExact(old)) {
        PyErr_SetString(PyExc_TypeError, "a series cell is not a float");
        return -1;
    }
    PyObject *updated = PyFloat_FromDouble(PyFloat_AS_DOUBLE(old) + amount);
    if (updated == NULL) {
        return -1;
    }
    PyList_SET_ITEM(cells, index, updated);
    Py_DECREF(old);
    return 0;
}

/* bounds (a tuple of floats) as doubles, in ``out`` (at most ``room`` of them) */
static Py_ssize_t
read_bounds(PyObject *bounds, double *out, Py_ssize_t room)
{
    if (!PyTuple_CheckExact(bounds) || PyTuple_GET_SIZE(bounds) > room) {
        PyErr_SetString(PyExc_TypeError, "bounds must be a tuple of at most 64 floats");
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < count; i++) {
        out[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            return -1;
        }
    }
    return count;
}

/* a and b are the same label value: the same object, or equal str or int objects */
static int
same_value(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (Py_TYPE(a) != Py_TYPE(b) || !(PyUnicode_CheckExact(a) || PyLong_CheckExact(a))) {
        return 0;
    }
    return PyObject_RichCompareBool(a, b, Py_EQ) == 1;
}

static int
count_finished(PyObject *finished, PyObject *method, Py_ssize_t requests)
{
    PyObject *count = PyDict_GetItemWithError(finished, method);
    if (count == NULL && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t before = count == NULL ? 0 : PyLong_AsSsize_t(count);
    PyObject *next = PyLong_FromSsize_t(before + requests);
    if (next == NULL) {
        return -1;
    }
    int failed = PyDict_SetItem(finished, method, next);
    Py_DECREF(next);
    return failed;
}

/* tally(items) -> {item: how many}: collections.Counter's count, for the recorder's list of
   started requests' methods, where one method object usually follows itself: a run of the same
   object is counted with one comparison per item and added to the dict once. */
static PyObject *
tally(PyObject *Py_UNUSED(module), PyObject *items)
{
    if (!PyList_CheckExact(items)) {
        PyErr_SetString(PyExc_TypeError, "tally(items: list)");
        return NULL;
    }
    PyObject *counts = PyDict_New();
    if (counts == NULL) {
        return NULL;
    }
    Py_ssize_t i = 0;
    while (i < PyList_GET_SIZE(items)) {
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_ssize_t run = 1;
        while (i + run < PyList_GET_SIZE(items) && PyList_GET_ITEM(items, i + run) == item) {
            run++;
        }
        Py_INCREF(item);
        int failed = count_finished(counts, item, run);
        Py_DECREF(item);
        if (failed < 0) {
            Py_DECREF(counts);
            return NULL;
        }
        i += run;
    }
    return counts;
}

/* -- request sums: the requests of each known label set added up as they finish ---------------- */

/* The recorder registers each label set whose raw values are already labels (a standard method,
   the handler label, a status from 100 to 599) once the cardinality guard has admitted it, with
   its series's cells.  A request of such a label set is then added to that label set's sums as it
   finishes, with no object made for it, and the sums go to the cells when the recorder drains
   them (at every scrape, and when its list of other requests is full).  Requests of other label
   sets, and of any label set before it is registered, take the recorder's list. */

#define SUM_METHODS 16

typedef struct {
    PyObject *method, *handler, *status;  /* method NULL: an empty slot */
    PyObject *cells;
    Py_hash_t hash;
    int no_body;
    int dirty;
    double *sums;  /* one per cell */
} SumsEntry;

struct Sums {
    PyObject_HEAD
    SumsEntry *entries;
    Py_ssize_t capacity;   /* a power of two, at least twice ``used`` */
    Py_ssize_t used;
    Py_ssize_t *dirty;     /* the entries added to since the last drain */
    Py_ssize_t dirty_count;
    Py_ssize_t last;       /* the entry the last request went to, or -1 */
    double duration_bounds[64], size_bounds[64];
    Py_ssize_t duration_count, size_count, offsets[3], width;
    PyObject *methods[SUM_METHODS];  /* the methods whose starts are counted here */
    Py_ssize_t started[SUM_METHODS];
    Py_ssize_t method_count;
    Py_ssize_t last_method;
};

/* Two exact str objects hold the same text. */
static int
same_text(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(a);
    return length == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b)
           && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)(length * PyUnicode_KIND(a))) == 0;
}

/* Where the label set is (its index), or where it would go (-2 - index); -1 with an error. */
static Py_ssize_t
sums_find(Sums *self, PyObject *method, PyObject *handler, PyObject *status, Py_hash_t *hash)
{
    Py_hash_t handler_hash = PyObject_Hash(handler);
    Py_hash_t status_hash = handler_hash == -1 ? -1 : PyObject_Hash(status);
    if (status_hash == -1) {
        return -1;
    }
    /* Not the method: a new str object per request under most servers, hashed anew each time;
       the few methods of one handler and status share a probe sequence. */
    Py_hash_t found_hash = (Py_hash_t)((Py_uhash_t)handler_hash * 1000003U ^ (Py_uhash_t)status_hash);
    if (found_hash == -1) {
        found_hash = -2;
    }
    *hash = found_hash;
    size_t mask = (size_t)self->capacity - 1;
    for (size_t i = (size_t)found_hash & mask;; i = (i + 1) & mask) {
        SumsEntry *entry = &self->entries[i];
        if (entry->method == NULL) {
            return -2 - (Py_ssize_t)i;
        }
        if (entry->hash == found_hash && same_text(entry->method, method) && same_value(entry->handler, handler)
            && same_value(entry->status, status)) {
            return (Py_ssize_t)i;
        }
    }
}

/* The request added to its label set's sums (1), or not a registered label set (0). */
static int
sums_add(Sums *self, PyObject *method, PyObject *handler, PyObject *status, double duration, double received,
         double sent)
{
    if (!PyUnicode_CheckExact(method) || !PyUnicode_CheckExact(handler) || !PyLong_CheckExact(status)
        || self->used == 0) {
        return 0;
    }
    Py_ssize_t index = self->last;
    SumsEntry *entry = index < 0 ? NULL : &self->entries[index];
    if (entry == NULL || entry->handler != handler || entry->status != status || !same_text(entry->method, method)) {
        Py_hash_t hash;
        index = sums_find(self, method, handler, status, &hash);
        if (index < 0) {
            if (index == -1) {
                PyErr_Clear();
            }
            return 0;
        }
        entry = &self->entries[index];
        self->last = index;
    }
    if (!entry->dirty) {
        entry->dirty = 1;
        self->dirty[self->dirty_count++] = index;
    }
    double *sums = entry->sums;
    const Py_ssize_t *offsets = self->offsets;
    sums[0] += 1.0;
    sums[offsets[0] + bucket_of(duration, self->duration_bounds, self->duration_count)] += 1.0;
    sums[offsets[0] + self->duration_count + 1] += duration;
    sums[offsets[1] + bucket_of(received, self->size_bounds, self->size_count)] += 1.0;
    sums[offsets[1] + self->size_count + 1] += received;
    if (entry->no_body) {
        sent = 0.0;
    }
    sums[offsets[2] + bucket_of(sent, self->size_bounds, self->size_count)] += 1.0;
    sums[offsets[2] + self->size_count + 1] += sent;
    return 1;
}

/* The request's start counted (1), or its method is not one counted here (0). */
static int
sums_start(Sums *self, PyObject *method)
{
    if (!PyUnicode_CheckExact(method)) {
        return 0;
    }
    Py_ssize_t last = self->last_method;
    if (last >= 0 && same_text(self->methods[last], method)) {
        self->started[last]++;
        return 1;
    }
    for (Py_ssize_t i = 0; i < self->method_count; i++) {
        if (same_text(self->methods[i], method)) {
            self->last_method = i;
            self->started[i]++;
            return 1;
        }
    }
    return 0;
}

static int
sums_grow(Sums *self)
{
    Py_ssize_t capacity = self->capacity * 2;
    SumsEntry *entries = PyMem_Calloc((size_t)capacity, sizeof(SumsEntry));
    Py_ssize_t *dirty = PyMem_Calloc((size_t)capacity, sizeof(Py_ssize_t));
    if (entries == NULL || dirty == NULL) {
        PyMem_Free(entries);
        PyMem_Free(dirty);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t dirty_count = 0;
    size_t mask = (size_t)capacity - 1;
    for (Py_ssize_t old = 0; old < self->capacity; old++) {
        SumsEntry *entry = &self->entries[old];
        if (entry->method == NULL) {
            continue;
        }
        size_t i = (size_t)entry->hash & mask;
        while (entries[i].method != NULL) {
            i = (i + 1) & mask;
        }
        entries[i] = *entry;
        if (entry->dirty) {
            dirty[dirty_count++] = (Py_ssize_t)i;
        }
    }
    PyMem_Free(self->entries);
    PyMem_Free(self->dirty);
    self->entries = entries;
    self->dirty = dirty;
    self->dirty_count = dirty_count;
    self->capacity = capacity;
    self->last = -1;
    return 0;
}

static PyObject *
sums_register(Sums *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyUnicode_CheckExact(args[0]) || !PyUnicode_CheckExact(args[1]) || !PyLong_CheckExact(args[2])
        || !PyList_CheckExact(args[3]) || PyList_GET_SIZE(args[3]) < self->width) {
        PyErr_SetString(PyExc_TypeError, "register(method: str, handler: str, status: int, cells: list, no_body: bool)");
        return NULL;
    }
    int no_body = PyObject_IsTrue(args[4]);
    if (no_body < 0) {
        return NULL;
    }
    if ((self->used + 1) * 2 > self->capacity && sums_grow(self) < 0) {
        return NULL;
    }
    Py_hash_t hash;
    Py_ssize_t index = sums_find(self, args[0], args[1], args[2], &hash);
    if (index == -1) {
        return NULL;
    }
    if (index >= 0) {  /* registered again: the cells are those the series has now */
        SumsEntry *entry = &self->entries[index];
        Py_SETREF(entry->cells, Py_NewRef(args[3]));
        entry->no_body = no_body;
        Py_RETURN_NONE;
    }
    double *sums = PyMem_Calloc((size_t)self->width, sizeof(double));
    if (sums == NULL) {
        return PyErr_NoMemory();
    }
    SumsEntry *entry = &self->entries[-2 - index];
    *entry = (SumsEntry){Py_NewRef(args[0]), Py_NewRef(args[1]), Py_NewRef(args[2]), Py_NewRef(args[3]), hash, no_body, 0, sums};
    self->used++;
    Py_RETURN_NONE;
}

/* drain() -> (started, finished, lost): every registered label set's sums added to its cells and
   set to zero; how many requests started per counted method, and finished per method, since the
   last drain; and how many cells could not be written (memory ran out: their amounts are lost).
   The numbers are taken out first, with no object made meanwhile, so no other thread can run
   and add to them halfway; if their objects cannot be made, they are all put back for the next
   drain. The in-progress gauge stays right whatever happens. */
static PyObject *
sums_drain(Sums *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t taken = self->dirty_count, width = self->width;
    Py_ssize_t *indexes = PyMem_Malloc((size_t)(taken > 0 ? taken : 1) * sizeof(Py_ssize_t));
    double *amounts = PyMem_Malloc((size_t)(taken > 0 ? taken : 1) * (size_t)width * sizeof(double));
    if (indexes == NULL || amounts == NULL) {
        PyMem_Free(indexes);
        PyMem_Free(amounts);
        return PyErr_NoMemory();
    }
    Py_ssize_t started_counts[SUM_METHODS];
    memcpy(started_counts, self->started, sizeof(started_counts));
    memset(self->started, 0, sizeof(self->started));
    for (Py_ssize_t d = 0; d < taken; d++) {
        SumsEntry *entry = &self->entries[self->dirty[d]];
        indexes[d] = self->dirty[d];
        memcpy(amounts + d * width, entry->sums, (size_t)width * sizeof(double));
        memset(entry->sums, 0, (size_t)width * sizeof(double));
        entry->dirty = 0;
    }
    self->dirty_count = 0;

    PyObject *result = NULL;
    PyObject *started = PyDict_New();
    PyObject *finished = started == NULL ? NULL : PyDict_New();
    if (finished == NULL) {
        goto put_back;
    }
    for (Py_ssize_t i = 0; i < self->method_count; i++) {
        if (started_counts[i] != 0 && count_finished(started, self->methods[i], started_counts[i]) < 0) {
            goto put_back;
        }
    }
    for (Py_ssize_t d = 0; d < taken; d++) {
        if (count_finished(finished, self->entries[indexes[d]].method, (Py_ssize_t)amounts[d * width]) < 0) {
            goto put_back;
        }
    }
    result = PyTuple_Pack(3, started, finished, ZERO);
    if (result == NULL) {
        goto put_back;
    }
    Py_DECREF(started);
    Py_DECREF(finished);
    /* Handed over: the amounts go to the cells (floats only: no Python code runs). */
    Py_ssize_t lost = 0;
    for (Py_ssize_t d = 0; d < taken; d++) {
        PyObject *cells = self->entries[indexes[d]].cells;
        for (Py_ssize_t c = 0; c < width; c++) {
            double amount = amounts[d * width + c];
            if (amount != 0.0 && add_to_cell(cells, c, amount) < 0) {
                PyErr_Clear();
                lost++;
            }
        }
    }
    PyMem_Free(indexes);
    PyMem_Free(amounts);
    PyObject *lost_count = lost == 0 ? NULL : PyLong_FromSsize_t(lost);
    if (lost_count == NULL) {
        PyErr_Clear();  /* at worst, lost cells are reported as none */
    }
    else {
        Py_SETREF(PyTuple_GET_ITEM(result, 2), lost_count);
    }
    return result;
put_back:
    /* Nothing was handed over: all of it waits for the next drain. */
    for (Py_ssize_t i = 0; i < self->method_count; i++) {
        self->started[i] += started_counts[i];
    }
    for (Py_ssize_t d = 0; d < taken; d++) {
        SumsEntry *entry = &self->entries[indexes[d]];
        for (Py_ssize_t c = 0; c < width; c++) {
            entry->sums[c] += amounts[d * width + c];
        }
        if (!entry->dirty) {
            entry->dirty = 1;
            self->dirty[self->dirty_count++] = indexes[d];
        }
    }
    PyMem_Free(indexes);
    PyMem_Free(amounts);
    Py_XDECREF(started);
    Py_XDECREF(finished);
    return NULL;
}

static int
sums_traverse(Sums *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; self->entries != NULL && i < self->capacity; i++) {
        SumsEntry *entry = &self->entries[i];
        Py_VISIT(entry->method);
        Py_VISIT(entry->handler);
        Py_VISIT(entry->status);
        Py_VISIT(entry->cells);
    }
    for (Py_ssize_t i = 0; i < self->method_count; i++) {
        Py_VISIT(self->methods[i]);
    }
    return 0;
}

static int
sums_clear(Sums *self)
{
    for (Py_ssize_t i = 0; self->entries != NULL && i < self->capacity; i++) {
        SumsEntry *entry = &self->entries[i];
        Py_CLEAR(entry->method);
        Py_CLEAR(entry->handler);
        Py_CLEAR(entry->status);
        Py_CLEAR(entry->cells);
        PyMem_Free(entry->sums);
        entry->sums = NULL;
        entry->dirty = 0;
    }
    self->used = 0;
    self->dirty_count = 0;
    self->last = -1;
    for (Py_ssize_t i = 0; i < self->method_count; i++) {
        Py_CLEAR(self->methods[i]);
    }
    self->method_count = 0;
    self->last_method = -1;
    return 0;
}

static void
sums_dealloc(Sums *self)
{
    PyObject_GC_UnTrack(self);
    sums_clear(self);
    PyMem_Free(self->entries);
    PyMem_Free(self->dirty);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Sums(methods, duration_bounds, size_bounds, offsets) */
static PyObject *
sums_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *methods, *duration_bounds, *size_bounds, *offsets;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)
        || !PyArg_UnpackTuple(args, "Sums", 4, 4, &methods, &duration_bounds, &size_bounds, &offsets)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Sums(methods, duration_bounds, size_bounds, offsets) takes no keywords");
        }
        return NULL;
    }
    if (!PyTuple_CheckExact(methods) || PyTuple_GET_SIZE(methods) > SUM_METHODS || !PyTuple_CheckExact(offsets)
        || PyTuple_GET_SIZE(offsets) != 3) {
        PyErr_SetString(PyExc_TypeError, "Sums takes a tuple of at most 16 methods and a tuple of three offsets");
        return NULL;
    }
    Sums *self = (Sums *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->last = -1;
    self->last_method = -1;
    self->capacity = 16;
    self->entries = PyMem_Calloc((size_t)self->capacity, sizeof(SumsEntry));
    self->dirty = PyMem_Calloc((size_t)self->capacity, sizeof(Py_ssize_t));
    if (self->entries == NULL || self->dirty == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->duration_count = read_bounds(duration_bounds, self->duration_bounds, 64);
    self->size_count = self->duration_count < 0 ? -1 : read_bounds(size_bounds, self->size_bounds, 64);
    if (self->size_count < 0) {
        Py_DECREF(self);
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        self->offsets[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(offsets, i));
        if (self->offsets[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(self);
            return NULL;
        }
    }
    if (self->offsets[0] < 1 || self->offsets[1] < self->offsets[0] + self->duration_count + 2
        || self->offsets[2] < self->offsets[1] + self->size_count + 2) {
        PyErr_SetString(PyExc_ValueError, "the offsets overlap");
        Py_DECREF(self);
        return NULL;
    }
    self->width = self->offsets[2] + self->size_count + 2;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(methods); i++) {
        PyObject *method = PyTuple_GET_ITEM(methods, i);
        if (!PyUnicode_CheckExact(method)) {
            PyErr_SetString(PyExc_TypeError, "the methods must be str");
            Py_DECREF(self);
            return NULL;
        }
        self->methods[self->method_count++] = Py_NewRef(method);
    }
    return (PyObject *)self;
}

/* add(method, handler, status, duration, received, sent) -> bool: what the middleware does as a
   request finishes (True: added; False: the recorder's ``record`` takes it) */
static PyObject *
sums_add_method(Sums *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "add(method, handler, status, duration, received, sent)");
        return NULL;
    }
    double numbers[3];
    for (int i = 0; i < 3; i++) {
        numbers[i] = PyFloat_AsDouble(args[3 + i]);
        if (numbers[i] == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyBool_FromLong(sums_add(self, args[0], args[1], args[2], numbers[0], numbers[1], numbers[2]));
}

/* start(method) -> bool: what the middleware does as a request starts (True: counted here) */
static PyObject *
sums_start_method(Sums *self, PyObject *method)
{
    return PyBool_FromLong(sums_start(self, method));
}

static PyMethodDef sums_methods[] = {
    {"add", (PyCFunction)(void (*)(void))sums_add_method, METH_FASTCALL,
     "add(method, handler, status, duration, received, sent) -> bool: a finished request added, if its label set is registered"},
    {"start", (PyCFunction)sums_start_method, METH_O, "start(method) -> bool: a started request counted, if its method is"},
    {"register", (PyCFunction)(void (*)(void))sums_register, METH_FASTCALL,
     "register(method, handler, status, cells, no_body): add this label set's requests to cells"},
    {"drain", (PyCFunction)sums_drain, METH_NOARGS,
     "drain() -> (started, finished, lost): the sums into their cells; requests per method since the last"},
    {NULL},
};

static PyTypeObject SumsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crowdmon._speedups.RequestSums",
    .tp_basicsize = sizeof(Sums),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The requests of each registered label set, added up as they finish.",
    .tp_new = sums_new,
    .tp_traverse = (traverseproc)sums_traverse,
    .tp_clear = (inquiry)sums_clear,
    .tp_dealloc = (destructor)sums_dealloc,
    .tp_methods = sums_methods,
};

static PyMethodDef module_functions[] = {
    {"tally", (PyCFunction)tally, METH_O, "tally(items: list) -> {item: how many}"},
    {"take_vectorcall", (PyCFunction)take_vectorcall, METH_O,
     "take_vectorcall(cls): servers' calls of cls's instances make no argument tuple."},
    {NULL},
};

/* -- the module -------------------------------------------------------------------------------- */

static PyObject *
attribute_of(const char *module_name, const char *name)
{
    PyObject *module = PyImport_ImportModule(module_name);
    if (module == NULL) {
        return NULL;
    }
    PyObject *value = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return value;
}

static int
intern_all(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&S_type, "type"}, {&S_http, "http"}, {&S_path, "path"}, {&S_root_path, "root_path"},
        {&S_method, "method"}, {&S_body, "body"}, {&S_more_body, "more_body"},
        {&S_status, "status"}, {&S_route, "route"}, {&S_fastapi, "fastapi"},
        {&S_effective_route_context, "effective_route_context"}, {&S_headers, "headers"},
        {&S_response_start, "http.response.start"}, {&S_response_body, "http.response.body"},
        {&S_response_pathsend, "http.response.pathsend"}, {&S_default, "_default"},
        {&S_follow_the_default, "_follow_the_default"},
        {&S_start_error, "_start_error"}, {&S_pathsend, "_pathsend"},
        {&S_response_zerocopysend, "http.response.zerocopysend"}, {&S_zerocopysend, "_zerocopysend"},
        {&S_route_label, "_route_label"}, {&S_exemplar, "_exemplar"}, {&S_get, "get"},
        {&S_site_start, "middleware.start"}, {&S_site_context, "middleware.context"},
        {&S_site_send, "middleware.send"}, {&S_site_handler, "middleware.handler"},
        {&S_site_record, "middleware.record"}, {&S_conclude, "_conclude"}, {&S_throw, "throw"},
        {&S_close, "close"}, {&S_http_request, "http.request"}, {&S_http_disconnect, "http.disconnect"},
        {&S_site_receive, "middleware.receive"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL) {
            return -1;
        }
    }
    return 0;
}

static int
perf_counter_is_monotonic(void)
{
    PyObject *info = NULL, *implementation = NULL;
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module != NULL) {
        info = PyObject_CallMethod(time_module, "get_clock_info", "s", "perf_counter");
        Py_DECREF(time_module);
    }
    if (info != NULL) {
        implementation = PyObject_GetAttrString(info, "implementation");
        Py_DECREF(info);
    }
    if (implementation == NULL) {
        return -1;
    }
    int same = PyUnicode_Check(implementation) && PyUnicode_CompareWithASCIIString(implementation, "clock_gettime(CLOCK_MONOTONIC)") == 0;
    Py_DECREF(implementation);
    return same;
}

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "crowdmon._speedups",
    .m_doc = "The middleware's request path, compiled; crowdmon._core is the same in Python.",
    .m_size = -1,
    .m_methods = module_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern_all() < 0) {
        return NULL;
    }
    UNMATCHED_HANDLER = attribute_of("crowdmon.catalogue", "UNMATCHED_HANDLER");
    CURRENT_REQUEST = attribute_of("crowdmon.context", "current_request");
    RECEIVE_AFTER_THE_END = attribute_of("crowdmon._core", "receive_after_the_end");
    SEND_AFTER_THE_END = attribute_of("crowdmon._core", "send_after_the_end");
    ODD_STATUS = attribute_of("crowdmon._core", "odd_status");
    DECLARED_SIZE = attribute_of("crowdmon._core", "declared_size");
    BODY_SIZE = attribute_of("crowdmon._core", "body_size");
    PERF_COUNTER = attribute_of("time", "perf_counter");
    INSTRUMENTATION_MODULE = attribute_of("crowdmon.instrumentation", "__dict__");
    if (UNMATCHED_HANDLER == NULL || CURRENT_REQUEST == NULL || RECEIVE_AFTER_THE_END == NULL
        || SEND_AFTER_THE_END == NULL || ODD_STATUS == NULL || DECLARED_SIZE == NULL || BODY_SIZE == NULL
        || PERF_COUNTER == NULL || INSTRUMENTATION_MODULE == NULL) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(CURRENT_REQUEST)) {
        PyErr_SetString(PyExc_TypeError, "crowdmon.context.current_request is not a ContextVar");
        return NULL;
    }
    PERF_COUNTER_IS_MONOTONIC = perf_counter_is_monotonic();
    if (PERF_COUNTER_IS_MONOTONIC < 0) {
        return NULL;
    }
    ZERO = PyLong_FromLong(0);
    STATUS_500 = PyLong_FromLong(500);
    STATUS_499 = PyLong_FromLong(499);
    EMPTY_STR = PyUnicode_InternFromString("");
    EMPTY_BYTES = PyBytes_FromStringAndSize(NULL, 0);
    if (ZERO == NULL || STATUS_500 == NULL || STATUS_499 == NULL || EMPTY_STR == NULL || EMPTY_BYTES == NULL) {
        return NULL;
    }
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&ExchangeType) < 0 || PyType_Ready(&CallType) < 0
        || PyType_Ready(&ReceivingType) < 0 || PyType_Ready(&SumsType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "MiddlewareCore", (PyObject *)&CoreType) < 0
        || PyModule_AddObjectRef(module, "ExchangeCore", (PyObject *)&ExchangeType) < 0
        || PyModule_AddObjectRef(module, "MiddlewareCall", (PyObject *)&CallType) < 0
        || PyModule_AddObjectRef(module, "MiddlewareReceive", (PyObject *)&ReceivingType) < 0
        || PyModule_AddObjectRef(module, "RequestSums", (PyObject *)&SumsType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
